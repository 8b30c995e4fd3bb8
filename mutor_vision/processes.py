"""The accelerate process state: which device this process uses, alone or as one rank of many.

accelerate keeps its state in a process-wide singleton that refuses a second setup with another
device or precision. A process that is one rank of a launched job sets it up once. A single
process may train or evaluate several times with different settings (the demo, the tests, a
notebook), so there the state is reset before each setup.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState


def launched() -> bool:
    """True when this process is one of several ranks (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cuda(device: str) -> bool:
    """``device: auto`` is CUDA when available; ``cpu`` pins the CPU."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"device must be 'auto' or 'cpu', got {device!r}")
    return device == "auto" and torch.cuda.is_available()


def process_state(device: str = "auto", timeout: timedelta | None = None) -> PartialState:
    """This process's state on ``device`` (gloo between CPU ranks, NCCL between GPUs)."""
    if not launched():
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own reset; see the module doc
        GradientState._reset_state()
    kwargs = {} if timeout is None else {"timeout": timeout}
    return PartialState(cpu=not use_cuda(device), **kwargs)
