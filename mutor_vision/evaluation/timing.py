"""Where an evaluation's time goes: each part of each batch, on the host and on the GPU.

:func:`~mutor_vision.evaluation.run.sample_and_measure` brackets its parts — ``sample`` (the
codes), ``decode`` (codes -> uint8 images), ``features`` (Inception) and ``copy`` (device to host)
— with a :class:`Timings` when it is given one (``bench/eval_pipeline.py``), and times what the
host waits for: ``results`` (a batch's images and features), ``png_queue`` (the PNG writer full)
and ``png_drain`` (the last PNGs at the end). On CUDA each part also records two CUDA events on the
stream it runs on, which give its GPU time and, against one origin event, where it lies on the
GPU's timeline: how long sampling and the other parts ran at the same time, and how long the GPU
had nothing to do. Without a Timings nothing is recorded (:data:`NO_TIMINGS`).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

SAMPLE = "sample"
MEASURE_PARTS = ("decode", "features", "copy")  # the parts that may run beside sampling


@dataclass
class _Record:
    part: str
    batch: int
    wall_s: float
    start: torch.cuda.Event | None
    end: torch.cuda.Event | None


class Timings:
    """Wall and GPU time per part and batch; :meth:`summary` adds them up (after the run)."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.records: list[_Record] = []
        self.waits: dict[str, float] = defaultdict(float)
        self.origin: torch.cuda.Event | None = None
        self.started = time.perf_counter()
        self.finished: float | None = None

    def begin(self) -> None:
        """The start of the timed run: the origin of the GPU timeline and of the wall clock."""
        self.records.clear()
        self.waits.clear()
        self.started, self.finished = time.perf_counter(), None
        if self.cuda:
            torch.cuda.synchronize()  # nothing queued before: the origin is now
            self.origin = _event()
            self.origin.record()

    def end(self) -> None:
        self.finished = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str, batch: int) -> Iterator[None]:
        """Time the block: the host's time in it, and on CUDA its GPU time on the current stream."""
        start = end = None
        if self.cuda:
            start = _event()
            start.record()
        began = time.perf_counter()
        yield
        wall = time.perf_counter() - began
        if self.cuda:
            end = _event()
            end.record()
        self.records.append(_Record(name, batch, wall, start, end))

    @contextlib.contextmanager
    def wait(self, name: str) -> Iterator[None]:
        """Time a wait of the host (no GPU time)."""
        began = time.perf_counter()
        yield
        self.waits[name] += time.perf_counter() - began

    def add_wait(self, name: str, seconds: float) -> None:
        self.waits[name] += seconds

    def summary(self) -> dict[str, Any]:
        """Per part: batches, wall seconds, and on CUDA GPU seconds (total and per batch); the waits;
        on CUDA the GPU timeline: busy, sampling, the other parts, both at once, idle."""
        if self.cuda:
            torch.cuda.synchronize()
        finished = self.finished if self.finished is not None else time.perf_counter()
        parts: dict[str, dict[str, Any]] = {}
        spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for record in self.records:
            entry = parts.setdefault(record.part, {"batches": 0, "wall_s": 0.0})
            entry["batches"] += 1
            entry["wall_s"] += record.wall_s
            if record.start is not None and record.end is not None and self.origin is not None:
                ms = record.start.elapsed_time(record.end)
                entry.setdefault("gpu_ms_per_batch", []).append(round(ms, 3))
                entry["gpu_s"] = entry.get("gpu_s", 0.0) + ms / 1e3
                begin = self.origin.elapsed_time(record.start) / 1e3
                spans[record.part].append((begin, begin + ms / 1e3))
        result: dict[str, Any] = {
            "wall_s": finished - self.started,
            "parts": parts,
            "waits_s": dict(self.waits),
        }
        if spans:
            sampling = _union(spans[SAMPLE])
            measuring = _union([s for part in MEASURE_PARTS for s in spans[part]])
            everything = _union([s for part_spans in spans.values() for s in part_spans])
            span = max(end for _, end in everything) if everything else 0.0
            busy = _length(everything)
            result["gpu_timeline"] = {
                "span_s": span,  # the origin to the last part's end
                "busy_s": busy,  # some part running
                "sampling_s": _length(sampling),
                "measuring_s": _length(measuring),  # decode, features, copies
                "both_s": _length(_intersect(sampling, measuring)),
                "idle_s": span - busy,
            }
        return result


class _NoTimings(Timings):
    """Records nothing (evaluations that nobody times)."""

    def __init__(self) -> None:
        super().__init__("cpu")

    def begin(self) -> None:
        pass

    @contextlib.contextmanager
    def part(self, name: str, batch: int) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def wait(self, name: str) -> Iterator[None]:
        yield

    def add_wait(self, name: str, seconds: float) -> None:
        pass


NO_TIMINGS = _NoTimings()


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same points as ``spans``."""
    merged: list[tuple[float, float]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intersection of two disjoint sorted interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        begin, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if begin < end:
            out.append((begin, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - begin for begin, end in spans)
