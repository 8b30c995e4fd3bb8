"""Fine-tune a Hugging Face causal LM with MuToR-1D registers (or next-token), from an adapter config.

    accelerate launch train_sft.py --config configs/text/gsm8k_mutor.yaml model.name_or_path=/models/gemma-2b
    python train_sft.py --config configs/text/gsm8k_ntp.yaml data.jsonl=train.jsonl data.hf_name=null ...

Overrides use dotted keys; ``--resume auto`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mutor_vision.config import ConfigError, load_yaml
from mutor_vision.text.config import TextTrainConfig
from mutor_vision.text.train import train_text
from mutor_vision.training import TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted keys into the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_yaml(TextTrainConfig, args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        result = train_text(config, resume=args.resume)
    except TrainingDiverged as error:
        logging.getLogger("train_sft").error("%s", error)
        return 3
    logging.getLogger("train_sft").info("%s at step %d (checkpoint: %s)", result.reason, result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
