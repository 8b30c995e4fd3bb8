"""The class-conditional training config (YAML -> typed dataclasses, validated); the loop keys it
inherits are ``loop_config.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mutor_vision.config import check
from mutor_vision.models.config import GPTConfig
from mutor_vision.training.loop_config import LoopConfig


@dataclass
class DataConfig:
    root: str = ""  # folder of token shards with manifest.json (tokenizer/encode_imagenet.py)
    num_workers: int = 4  # loader workers per rank
    shuffle_buffer: int = 1000  # samples held for shuffling, per loader worker
    on_error: Literal["raise", "skip"] = "raise"  # corrupt shards: stop with the shard's name, or skip
    segment_steps: int = 1000  # the data stream is re-seeded every this many steps; a resume replays <= one segment

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.segment_steps >= 1, "segment_steps", "must be >= 1")


@dataclass
class TrainConfig(LoopConfig):
    """Class-conditional image training: the model, its token shards, and the loop keys."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 360_000  # optimizer steps
    init_from: str | None = None  # an official LlamaGen checkpoint (or an export) to start from
    trust_checkpoint: bool = False  # allow unpickling init_from (LlamaGen DDP files pickle argparse)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.steps >= 1, "steps", "must be >= 1")
