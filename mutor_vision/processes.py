"""The accelerate process state: which device this process uses, alone or as one rank of many.

accelerate keeps its state in a process-wide singleton that refuses a second setup with another
device or precision. A process that is one rank of a launched job sets it up once. A single
process may train or evaluate several times with different settings (the demo, the tests, a
notebook), so there the state is reset before each setup.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState

from mutor_vision.errors import ConfigError, PeerLost, first_line
from mutor_vision.locks import FolderLock, acquire

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # how long a collective waits for a rank that does not come
# How gloo and NCCL report a peer that died, closed its connections or never answered.
_LOST_PEER = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Connection refused|Transport endpoint|Timed out|timed out|"
    r"[Tt]imeout|NCCL communicator was aborted|ProcessGroupNCCL|No route to host"
)


def launched() -> bool:
    """True when this process is one of several ranks (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cuda(device: str) -> bool:
    """``device: auto`` is CUDA when available; ``cpu`` pins the CPU."""
    if device not in ("auto", "cpu"):
        raise ValueError(f"device must be 'auto' or 'cpu', got {device!r}")
    return device == "auto" and torch.cuda.is_available()


def process_state(device: str = "auto", timeout: timedelta | None = None) -> PartialState:
    """This process's state on ``device`` (gloo between CPU ranks, NCCL between GPUs). ``timeout``:
    how long a collective waits for a rank that does not come (the first call of a process sets it)."""
    if not launched():
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own reset; see the module doc
        GradientState._reset_state()
    kwargs = {} if timeout is None else {"timeout": timeout}
    return PartialState(cpu=not use_cuda(device), **kwargs)


@contextmanager
def main_process_holds(
    state: PartialState, folder: str | os.PathLike, label: str, force: bool = False
) -> Iterator[FolderLock | None]:
    """The main process holds ``folder``'s lock (``mutor_vision/locks.py``) for the block; other ranks hold none.

    Every rank waits here until the main process has the lock, so no rank touches the folder before;
    when it is refused, every rank stops with the same message instead of hanging in a collective.
    """
    lock, failure = None, None
    if state.is_main_process:
        try:
            lock = acquire(Path(folder), label, force=force)
        except Exception as error:  # any failure must reach the other ranks, or they wait for ever
            failure = error
    if state.num_processes > 1:
        message = [None if failure is None else str(failure)]
        torch.distributed.broadcast_object_list(message, src=0, device=state.device)
        if failure is None and message[0] is not None:
            failure = ConfigError(message[0])
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def lost_peer(error: BaseException) -> str | None:
    """What was lost, in a few words, when ``error`` (or what it was raised from) says another rank or
    its machine stopped answering; None for any other error, and always in a single process."""
    if not launched():
        return None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, PeerLost):
            return str(error)
        text = str(error)
        dist_error = getattr(torch.distributed, "DistError", ())
        if isinstance(error, dist_error) or (isinstance(error, RuntimeError) and _LOST_PEER.search(text)):
            # gloo: "[.../pair.cc:545] Read error [127.0.0.1]:49796: Connection reset by peer. This is ..."
            core = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))
            return "a collective failed: " + core.split(". ")[0]
        error = error.__cause__ or error.__context__
    return None


def cpu_child_env(checkout: str | os.PathLike) -> dict[str, str]:
    """The caller's environment for CPU child processes (tests, benchmarks): ``PYTHONPATH`` extended
    (never replaced) with the checkout, CUDA hidden so ranks use gloo on a GPU machine too, and
    accelerate told to use the CPU (``accelerate launch --cpu`` would start a single process)."""
    path = os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p)
    cpu_only = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    return {**os.environ, "PYTHONPATH": path, **cpu_only}


def free_port() -> int:
    """A loopback port nothing listens on now (parallel runs of tests and benchmarks never collide)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_ranks_command(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``num_processes`` CPU ranks on a free port."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    return [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]  # fmt: skip
