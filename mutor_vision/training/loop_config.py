"""The keys of the training loop, shared by every task: optimiser, EMA, batch, seed, precision, saving.

The image config (``training/config.py``) and the text config (``text/config.py``) inherit
:class:`LoopConfig`. This module imports no model, so the text path loads it without the image GPT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mutor_vision.config import check


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.05  # on 2-D parameters only (matrices, embeddings); never norms or the register
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    schedule: Literal["constant", "warmup_constant", "warmup_cosine", "warmup_linear"] = "constant"  # warm-up is linear
    warmup_steps: int = 0  # linear warm-up steps (0: warmup_ratio decides)
    warmup_ratio: float = 0.0  # warmup as a fraction of all steps, used when warmup_steps is 0
    min_lr: float = 0.0  # floor of the cosine / linear decay

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")


@dataclass
class EMAConfig:
    enabled: bool = False  # keep an exponential moving average of the weights (exported to export_ema/)
    decay: float = 0.9999  # EMA decay per optimizer step

    def __post_init__(self) -> None:
        check(0 < self.decay < 1, "decay", f"must be in (0, 1), got {self.decay}")


@dataclass
class LoopConfig:
    """The keys of the training loop, shared by every task (image and text configs inherit them)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    global_batch_size: int = 1024  # samples per optimizer step, over all ranks
    micro_batch_size: int = 128  # samples per rank per forward; accumulation = global / (micro · ranks)
    seed: int = 0  # every random draw of a run derives from it, with the rank and the step
    mixed_precision: Literal["no", "bf16"] = "bf16"  # CPU always runs fp32
    device: Literal["auto", "cpu"] = "auto"  # auto: CUDA when available; cpu pins the CPU (bit-exact tests)
    compile: bool = False  # torch.compile the training forward (CUDA only; ignored on CPU)
    out_dir: str = "runs/c2i"  # checkpoints/, logs/ and config.yaml
    save_every: int = 5000  # steps between checkpoints (never changes what is trained)
    keep_last: int = 3  # complete checkpoints kept
    log_every: int = 50  # steps between log lines and TensorBoard points (loss means over them)
    tensorboard: bool = True  # scalars under <out_dir>/logs
    wandb: bool = False  # also log to Weights & Biases (the wandb extra: pip install -e ".[wandb]")
    collective_timeout_s: float = 600.0  # seconds a collective waits for a rank that does not come (a lost machine)
    peak_tflops: float = 989.0  # per device, for MFU (default: the dense bf16 datasheet peak of an SXM Hopper)

    def __post_init__(self) -> None:
        check(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        check(
            self.global_batch_size % self.micro_batch_size == 0,
            "global_batch_size",
            f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
        )
        check(self.save_every >= 1, "save_every", "must be >= 1")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(bool(self.out_dir), "out_dir", "must be set")
        check(self.peak_tflops > 0, "peak_tflops", "must be > 0")
        check(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 (seconds)")
