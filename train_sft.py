"""Fine-tune a Hugging Face causal LM with MuToR-1D registers (or next-token), from an adapter config.

    accelerate launch train_sft.py --config configs/text/gsm8k_mutor.yaml model.name_or_path=/models/gemma-2b
    python train_sft.py --config configs/text/gsm8k_ntp.yaml data.hf_name=null data.jsonl=train.jsonl ...

Overrides use dotted keys; ``--resume auto`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import sys

from mutor_vision.cli import train_main
from mutor_vision.text.config import TextTrainConfig
from mutor_vision.text.train import train_text


def main(argv: list[str] | None = None) -> int:
    return train_main(__doc__, TextTrainConfig, train_text, argv, "train_sft")


if __name__ == "__main__":
    sys.exit(main())
