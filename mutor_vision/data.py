"""Token shards in, training batches out.

Each rank streams from its own disjoint subset of shards (an explicit split of the shard list),
resampled forever with seeds derived from ``seed`` (the trainer derives it from (seed, rank,
step) so a resumed run sees the data an uninterrupted one would). Samples pass a shuffle buffer,
one random crop of the stored ``(n_crops, h, w)`` grids is picked per sample, and batches come out
as ``tokens (B, h·w) long, labels (B,) long``. Every rank yields exactly ``num_batches`` batches.

Why not webdataset's ``WebDataset(resampled=True).shuffle().batched()`` + ``WebLoader``: exact
resume needs every draw (shard, shuffle slot, crop) from one seeded ``random.Random`` per worker,
and each shard's sample count is compared with the manifest after it is read (a tar cut at a member
boundary reads as a valid, shorter tar). The tar parsing itself is webdataset's. Loader workers
ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and the main process must
outlive its workers long enough to save a checkpoint (see ``mutor_vision/training/runtime.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mutor_vision.seeds import hash_seed
from mutor_vision.shards import DataMismatch, SampleSpec, ShardError, check_manifest, decode_sample, read_manifest

log = logging.getLogger(__name__)
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _ShortShard(ValueError):
    """A shard read back with fewer samples than the manifest lists (or none at all)."""


def _worker() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class _TokenStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline: resampled shards -> samples -> shuffle -> crop -> batches."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int | None],
        batch_size: int,
        spec: SampleSpec,
        seed: int,
        shuffle_buffer: int,
        on_error: Literal["raise", "skip"],
    ) -> None:
        super().__init__()
        self.urls, self.counts, self.batch_size, self.spec, self.seed = urls, counts, batch_size, spec, seed
        self.shuffle_buffer, self.on_error = shuffle_buffer, on_error

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = random.Random(f"{self.seed}-{_worker()}")  # string seeds hash stably across processes
        samples = self._shuffled(self._samples(rng), rng)
        while True:
            batch = [next(samples) for _ in range(self.batch_size)]
            yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)

    def _samples(self, rng: random.Random) -> Iterator[tuple[torch.Tensor, int]]:
        # lazy: webdataset is a slow import; only tar reading/writing needs it
        from webdataset.tariterators import tarfile_samples

        usable = list(range(len(self.urls)))
        while True:
            index = usable[rng.randrange(len(usable))]  # resampled: shards drawn with replacement, forever
            url, expected = self.urls[index], self.counts[index]
            read = 0
            try:
                for sample in tarfile_samples([{"url": url}]):
                    tokens, label = decode_sample(sample, self.spec, url)
                    read += 1
                    crop = tokens[rng.randrange(tokens.shape[0])]  # one random crop, converted alone
                    yield torch.from_numpy(crop.astype(np.int64)).flatten(), label
                if read == 0 or (expected is not None and read != expected):
                    raise _ShortShard(f"read {read} samples, the manifest lists {expected}")
            except DataMismatch:
                raise  # the dataset does not fit: skipping cannot help
            except Exception as error:
                message = f"{url}: corrupt or truncated shard ({type(error).__name__}: {error})"
                if self.on_error == "raise":
                    raise ShardError(message + "; set data.on_error: skip to skip bad shards") from None
                usable.remove(index)  # never drawn again in this stream (the loader of one data segment)
                log.warning("skipping %s; %d of %d shards left", message, len(usable), len(self.urls))
                if not usable:  # every shard bad: fail, never spin forever
                    last = f"the last: {message}"
                    raise ShardError(f"all {len(self.urls)} shards of this rank are unreadable, {last}") from None

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        buffer: list = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        yield from buffer


class TokenLoader:
    """``num_batches`` batches from a worker pool; iterate once per segment (workers start at ``iter``)."""

    def __init__(self, stream: _TokenStream, num_batches: int, num_workers: int) -> None:
        self.num_batches = num_batches
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            worker_init_fn=_ignore_stop_signals if num_workers else None,
            # Its own generator: starting an iterator draws a seed, never from torch's global stream
            # (which seeds dropout in training). Every draw of the stream itself is seeded by ``seed``.
            generator=torch.Generator().manual_seed(stream.seed),
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with _stop_signals_blocked():  # workers fork with the signals pending, then ignore them
            batches = iter(self.loader)
        return itertools.islice(batches, self.num_batches)


@contextlib.contextmanager
def _stop_signals_blocked():
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that arrived meanwhile is delivered now


def _ignore_stop_signals(worker_id: int) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def token_loader(
    root: str | Path,
    batch_size: int,
    num_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    on_error: Literal["raise", "skip"] = "raise",
    expect: dict[str, Any] | None = None,
) -> TokenLoader:
    """A loader of ``num_batches`` batches (tokens (B, h·w), labels (B,)) for this rank.

    ``expect`` (``grid_size``, ``vocab_size``, ``num_classes``) checks the manifest against the
    model. Ranks get disjoint shard subsets, so there must be at least ``world_size`` shards
    (aim for many more than world_size × num_workers). Every rank checks every rank's share from
    the manifest, so a share without samples stops all ranks before any of them waits on another.
    """
    manifest = read_manifest(root)
    if expect is not None:
        check_manifest(manifest, **expect)
    urls, counts = manifest.urls, manifest.shard_counts or [None] * len(manifest.shards)
    if len(urls) < world_size:
        raise ShardError(f"{root}: {len(urls)} shard(s) for {world_size} ranks; write more, smaller shards")
    for r in range(world_size):
        if all(c == 0 for c in counts[r::world_size]):
            raise ShardError(
                f"{manifest.path}: rank {r} of {world_size} would read only empty shards "
                f"{manifest.shards[r::world_size][:5]}; re-encode with more samples per shard or fewer shards"
            )
    stream = _TokenStream(
        [u for u, c in zip(urls[rank::world_size], counts[rank::world_size], strict=True) if c != 0],
        [c for c in counts[rank::world_size] if c != 0],
        batch_size,
        SampleSpec.of(manifest, (expect or {}).get("num_classes")),
        seed=hash_seed(seed, rank),
        shuffle_buffer=shuffle_buffer,
        on_error=on_error,
    )
    return TokenLoader(stream, num_batches, num_workers)
