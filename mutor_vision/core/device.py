"""Two device helpers every layer needs, kept here because the core is the one layer all may import:
the device a random generator draws on, and a host-to-GPU copy that never makes the host wait."""

from __future__ import annotations

import torch
from torch import Tensor


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (``torch.rand`` and ``torch.randint`` need its own device); the CPU for None."""
    return generator.device if generator is not None else torch.device("cpu")


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``. From the host to CUDA through pinned memory without blocking: the copy
    waits in the GPU's queue, not on the host (a plain copy from pageable memory waits for the GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
