"""AdamW with weight decay on 2-D parameters only, and the LR schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mutor_vision.training.loop_config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """Decay matrices and embeddings (dim >= 2); never norms or the 1-D register vector (LlamaGen)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in decay) and bool(decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based).

    The warm-up is Hugging Face's, which the MuToR authors' text recipe runs: ``ceil(warmup_ratio ×
    total)`` steps whose factor rises linearly from 0 (the first update has learning rate 0), then
    the decay from 1 at the end of the warm-up.
    """
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    if config.schedule != "constant" and step < warmup:
        return step / warmup
    floor = config.min_lr / config.lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if config.schedule == "warmup_cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "warmup_linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """A LambdaLR stepped once per optimizer step by the loop (never prepared by accelerate)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps))
