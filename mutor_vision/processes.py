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


def cpu_child_env(checkout: str | os.PathLike) -> dict[str, str]:
    """The caller's environment for CPU child processes (tests, benchmarks): ``PYTHONPATH`` extended
    (never replaced) with the checkout, CUDA hidden so ranks use gloo on a GPU machine too, and
    accelerate told to use the CPU (``accelerate launch --cpu`` would start a single process)."""
    path = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p)
    cpu_only = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    return {**os.environ, "PYTHONPATH": path, **cpu_only}


def cpu_ranks_command(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``num_processes`` CPU ranks on a free port (parallel runs never collide)."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    return [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]  # fmt: skip
