"""Train a class-conditional LlamaGen GPT with MuToR registers (or the next-token baseline).

    accelerate launch train_c2i.py --config configs/c2i/llamagen_b_mutor2d.yaml [key=value ...] [--resume auto]
    accelerate launch --config_file configs/accelerate/1node_8gpu_ddp.yaml train_c2i.py --config ...
    python train_c2i.py --config configs/c2i/tiny_cpu.yaml data.root=PATH_TO_SHARDS   # one CPU process

Overrides use dotted keys: ``model.registers.num_registers=256 optim.lr=1e-4 steps=1000``.
"""

from __future__ import annotations

import sys

from mutor_vision.cli import train_main
from mutor_vision.training.c2i import train
from mutor_vision.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    return train_main(__doc__, TrainConfig, train, argv, "train_c2i")


if __name__ == "__main__":
    sys.exit(main())
