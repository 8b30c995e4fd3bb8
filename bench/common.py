"""What every benchmark records with its numbers: the machine, torch, the device, the command and the commit."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def provenance(benchmark: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """The header of a results file: benchmark name, machine, torch, device, the exact command."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    script = Path(sys.argv[0])
    command = f"python bench/{script.name} " + " ".join(sys.argv[1:])
    return {
        "benchmark": benchmark,
        "machine": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": name,
        "command": command.strip(),
        "commit": commit(),
    }


@functools.cache  # read once, as the benchmark starts (below): later edits do not change what ran
def commit() -> str | None:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; ``GIT_COMMIT`` where the
    copy's git is absent or stale (a device machine); None outside git."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    git = {"cwd": root, "capture_output": True, "text": True, "timeout": 10}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` (nothing when None)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def wall_time(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, CUDA's queued work finished before and after (launches are async)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """The median :func:`wall_time` of ``repeats`` calls after ``warmup`` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall_time(fn) for _ in range(repeats))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_run(fn, steps: int) -> dict:
    """GPU kernel time of one ``fn()`` against its wall time, per step (``steps`` steps in one call: decode
    steps for sampling, the chained training steps), and the top kernels. CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: compiled code and CUDA graphs exist before recording
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.device_time)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:12]
    return {
        "wall_s": wall,
        "wall_ms_per_step": wall * 1e3 / steps,
        "gpu_ms_per_step": gpu_us / 1e3 / steps,
        "gpu_busy_fraction": gpu_us / 1e6 / wall,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels": [{"name": n[:120], "count": len(t), "total_ms": sum(t) / 1e3} for n, t in top],
    }


commit()  # the code a benchmark runs is the checkout at its start, whatever changes while it runs
