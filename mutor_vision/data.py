"""Token-grid shards in, training batches out (webdataset; ecosystem.md §2).

Each rank streams from its own disjoint subset of shards (an explicit node split of the shard
list), resampled forever with seeds derived from ``seed`` (the trainer derives it from (seed,
rank, step) so a resumed run sees the data an uninterrupted one would). Samples pass a shuffle
buffer, one random crop of the stored ``(n_crops, h, w)`` grids is picked per sample, and batches
come out as ``tokens (B, h·w) long, labels (B,) long``. ``WebLoader(...).with_epoch(N)`` gives
every rank the same number of batches; never pass the loader through ``accelerator.prepare``.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """A shard or its manifest is missing, corrupt, or does not match what training expects."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    shards: list[str]
    num_samples: int
    grid: tuple[int, int]
    num_crops: int
    codebook_size: int
    num_classes: int | None
    raw: dict[str, Any]

    @property
    def urls(self) -> list[str]:
        return [str(self.root / name) for name in self.shards]


def read_manifest(root: str | Path) -> Manifest:
    """The manifest written by ``tokenizer/encode_imagenet.py`` (a clear error when absent/broken)."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(
            root=root,
            shards=list(raw["shards"]),
            num_samples=int(raw["num_samples"]),
            grid=tuple(raw["grid"]),
            num_crops=int(raw["num_crops"]),
            codebook_size=int(raw["codebook_size"]),
            num_classes=raw.get("num_classes"),
            raw=raw,
        )
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (shards are written by tokenizer/encode_imagenet.py)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from None
    missing = [name for name in manifest.shards if not (root / name).is_file()]
    if missing:
        raise ShardError(f"{root}: {len(missing)} shard(s) listed in the manifest are missing: {missing[:5]}")
    return manifest


def check_manifest(manifest: Manifest, grid_size: int, vocab_size: int, num_classes: int) -> None:
    """Shards must match the model: grid, codebook size, class count."""
    problems = []
    if tuple(manifest.grid) != (grid_size, grid_size):
        problems.append(f"grid {manifest.grid} but the model expects {grid_size}x{grid_size}")
    if manifest.codebook_size != vocab_size:
        problems.append(f"codebook size {manifest.codebook_size} but the model's vocab_size is {vocab_size}")
    if manifest.num_classes is not None and manifest.num_classes > num_classes:
        problems.append(f"{manifest.num_classes} classes but the model has {num_classes}")
    if problems:
        raise ShardError(f"{manifest.root / MANIFEST}: " + "; ".join(problems))


class GridMismatch(ValueError):
    """A sample's token grid disagrees with the manifest (a wrong dataset, not a broken file)."""


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TokenStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline: resampled shards -> samples -> shuffle -> crop -> batches."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        grid: tuple[int, int],
        seed: int,
        shuffle_buffer: int,
        on_error: Literal["raise", "skip"],
        max_consecutive_errors: int,
    ) -> None:
        super().__init__()
        self.urls, self.batch_size, self.grid, self.seed = urls, batch_size, grid, seed
        self.shuffle_buffer, self.on_error = shuffle_buffer, on_error
        self.max_consecutive_errors = max_consecutive_errors

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, _ = _worker()
        rng = random.Random(f"{self.seed}-{worker}")  # string seeds hash stably across processes
        samples = self._shuffled(self._samples(rng), rng)
        while True:
            batch = [next(samples) for _ in range(self.batch_size)]
            yield torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)

    def _samples(self, rng: random.Random) -> Iterator[tuple[torch.Tensor, int]]:
        from webdataset.tariterators import tarfile_samples

        errors = 0
        while True:
            url = rng.choice(self.urls)  # resampled: shards drawn with replacement, forever
            try:
                for sample in tarfile_samples([{"url": url}]):
                    tokens, label = self._decode(sample)
                    errors = 0
                    crop = tokens[rng.randrange(tokens.shape[0])]  # one random crop, converted alone
                    yield torch.from_numpy(crop.astype(np.int64)).flatten(), label
            except GridMismatch as error:
                raise ShardError(f"{url}: {error}") from None
            except Exception as error:
                message = f"{url}: corrupt or truncated shard ({type(error).__name__}: {error})"
                if self.on_error == "raise":
                    raise ShardError(message + "; set data.on_error: skip to skip bad shards") from None
                errors += 1
                log.warning("skipping: %s (%d in a row)", message, errors)
                if errors >= self.max_consecutive_errors:  # every shard bad: fail, never spin forever
                    raise ShardError(f"{errors} shard errors in a row, the last: {message}") from None

    def _decode(self, sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != self.grid:
            raise GridMismatch(f"sample {sample.get('__key__')} has tokens {tokens.shape}, manifest grid {self.grid}")
        return tokens, int(sample["cls"])

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
    max_consecutive_errors: int = 100,
    expect: dict[str, int] | None = None,
):
    """A ``WebLoader`` of ``num_batches`` batches (tokens (B, h·w), labels (B,)) for this rank.

    ``expect`` (``grid_size``, ``vocab_size``, ``num_classes``) checks the manifest against the
    model. Ranks get disjoint shard subsets, so there must be at least ``world_size`` shards
    (aim for many more than world_size × num_workers).
    """
    import webdataset as wds

    manifest = read_manifest(root)
    if expect is not None:
        check_manifest(manifest, **expect)
    urls = manifest.urls
    if len(urls) < world_size:
        raise ShardError(f"{root}: {len(urls)} shard(s) for {world_size} ranks; write more, smaller shards")
    rank_urls = urls[rank::world_size]  # explicit node split: disjoint shards per rank
    stream = _TokenStream(
        rank_urls,
        batch_size,
        manifest.grid,
        seed=hash_seed(seed, rank),
        shuffle_buffer=shuffle_buffer,
        on_error=on_error,
        max_consecutive_errors=max_consecutive_errors,
    )
    loader = wds.WebLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
    return loader.with_epoch(num_batches)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. (seed, rank, step)), stable across processes and runs."""
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_synthetic_shards(
    root: str | Path,
    num_shards: int,
    per_shard: int,
    grid: int,
    vocab_size: int,
    num_classes: int,
    num_crops: int = 2,
    seed: int = 0,
) -> Manifest:
    """Random-token shards + manifest in the encoder's format (tests and benchmarks; no images)."""
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for s in range(num_shards):
        names.append(f"train-{s:06d}.tar")
        with wds.TarWriter(str(root / names[-1]), mtime=0.0) as writer:
            for i in range(per_shard):
                tokens = rng.integers(0, vocab_size, (num_crops, grid, grid)).astype(np.uint16)
                writer.write(
                    {"__key__": f"{s:06d}_{i:06d}", "tokens.npy": tokens, "cls": int(rng.integers(num_classes))}
                )
    manifest = {
        "num_samples": num_shards * per_shard,
        "num_shards": num_shards,
        "shards": names,
        "grid": [grid, grid],
        "num_crops": num_crops,
        "codebook_size": vocab_size,
        "num_classes": num_classes,
        "tokenizer": {"kind": "synthetic"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return read_manifest(root)
