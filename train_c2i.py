"""Train a class-conditional LlamaGen GPT with MuToR registers (or the next-token baseline).

    accelerate launch train_c2i.py --config configs/c2i/llamagen_b_mutor2d.yaml [key=value ...] [--resume auto]
    accelerate launch --config_file configs/accelerate/1node_8gpu_ddp.yaml train_c2i.py --config ...
    python train_c2i.py --config configs/c2i/tiny_cpu.yaml data.root=runs/shards   # one CPU process

Overrides use dotted keys: ``model.registers.num_registers=256 optim.lr=1e-4 steps=1000``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mutor_vision.config import ConfigError, load_yaml
from mutor_vision.training import TrainConfig, TrainingDiverged, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file under configs/c2i/")
    parser.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in out_dir) or a path")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted keys into the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_yaml(TrainConfig, args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        result = train(config, resume=args.resume)
    except TrainingDiverged as error:
        logging.getLogger("train_c2i").error("%s", error)
        return 3
    logging.getLogger("train_c2i").info("%s at step %d (checkpoint: %s)", result.reason, result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
