"""The token-shard format, read and written here only (encoder, loader, demo and tests use this).

A dataset folder holds webdataset tars and one manifest::

    train-000000.tar      samples: __key__ (unique, no dots), tokens.npy (uint16 (n_crops, h, w)), cls (int)
    ...
    manifest.json         shards, per-shard sample counts, grid, crops, codebook size, classes, tokenizer

``tokenizer/encode_imagenet.py`` writes real datasets (its resume files are its own); the
training loader (``mutor_vision/data.py``) reads them. Every sample is checked as it is decoded:
token ids inside the codebook, labels inside the classes (the row ``num_classes`` is the CFG null
class and must never be a data label), integer tokens of the manifest's grid. A violation is a
:class:`DataMismatch` naming the shard and the sample key — the dataset does not fit the model,
which no skipping can repair.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mutor_vision.errors import InputError
from mutor_vision.files import atomic_write, atomic_write_json, storage_faults

MANIFEST = "manifest.json"
TOKENS = "tokens.npy"
LABEL = "cls"


class ShardError(InputError):
    """A shard or its manifest is missing, corrupt, or does not match what training expects."""


class DataMismatch(ShardError):
    """A sample that reads fine but does not fit the manifest or the model (wrong dataset, not a broken file)."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    shards: list[str]
    shard_counts: list[int] | None  # samples per shard (None in manifests that predate the field)
    num_samples: int
    grid: tuple[int, int]
    num_crops: int
    codebook_size: int
    num_classes: int | None
    raw: dict[str, Any]

    @property
    def urls(self) -> list[str]:
        return [str(self.root / name) for name in self.shards]

    @property
    def path(self) -> Path:
        return self.root / MANIFEST


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of a shard folder; a clear :class:`ShardError` when absent, broken or inconsistent."""
    root = Path(root)
    path = root / MANIFEST
    try:
        raw = json.loads(path.read_text())
        counts = raw.get("shard_counts")
        manifest = Manifest(
            root=root,
            shards=list(raw["shards"]),
            shard_counts=None if counts is None else [int(c) for c in counts],
            num_samples=int(raw["num_samples"]),
            grid=tuple(int(g) for g in raw["grid"]),
            num_crops=int(raw["num_crops"]),
            codebook_size=int(raw["codebook_size"]),
            num_classes=None if raw.get("num_classes") is None else int(raw["num_classes"]),
            raw=raw,
        )
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (shards are written by tokenizer/encode_imagenet.py)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ShardError(f"{path}: malformed manifest ({type(error).__name__}: {error})") from None
    counts = manifest.shard_counts
    if counts is not None and (len(counts) != len(manifest.shards) or sum(counts) != manifest.num_samples):
        raise ShardError(f"{path}: shard_counts ({len(counts)} shards, {sum(counts)} samples) disagree with shards")
    if manifest.num_samples < 1 or not manifest.shards:
        raise ShardError(f"{path}: the dataset holds no samples (did every input image fail to decode?)")
    missing = [name for name in manifest.shards if not (root / name).is_file()]
    if missing:
        raise ShardError(f"{root}: {len(missing)} shard(s) listed in the manifest are missing: {missing[:5]}")
    return manifest


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Manifest:
    """Write ``manifest.json`` (atomically, last: a folder with it is complete) and read it back."""
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return read_manifest(root)


def check_manifest(manifest: Manifest, grid_size: int, vocab_size: int, num_classes: int) -> None:
    """Shards must match the model: grid, codebook size, class count.

    The error names the model keys that would make them match (``model.grid_size=16
    model.vocab_size=16384`` for VQ-16 shards), as overrides to paste. Fewer data classes than the
    model has is legitimate (the training task warns about it); more is not.
    """
    problems, fixes = [], []
    height, width = manifest.grid
    if (height, width) != (grid_size, grid_size):
        problems.append(f"grid {height}x{width} but the model's grid_size is {grid_size}")
        if height == width:  # the model's grid is square: a non-square one fits no key
            fixes.append(f"model.grid_size={height}")
    if manifest.codebook_size != vocab_size:
        problems.append(f"codebook size {manifest.codebook_size} but the model's vocab_size is {vocab_size}")
        fixes.append(f"model.vocab_size={manifest.codebook_size}")
    if manifest.num_classes is not None and manifest.num_classes > num_classes:
        problems.append(f"{manifest.num_classes} classes but the model's num_classes is {num_classes}")
        fixes.append(f"model.num_classes={manifest.num_classes}")
    if problems:
        remedy = f"; to train on these shards set {' '.join(fixes)}" if fixes else ""
        raise ShardError(f"{manifest.path}: " + "; ".join(problems) + remedy)


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a dataset must satisfy."""

    grid: tuple[int, int]
    codebook_size: int
    num_classes: int | None  # the manifest's classes; None: only labels >= 0 (and model_classes) are checked
    model_classes: int | None = None  # model.num_classes: a label at or above it has no embedding row

    @classmethod
    def of(cls, manifest: Manifest, num_classes: int | None = None) -> SampleSpec:
        """The manifest's spec; ``num_classes`` (the model's ``model.num_classes``) bounds labels too."""
        return cls(manifest.grid, manifest.codebook_size, manifest.num_classes, num_classes)


def encode_sample(key: str, tokens: np.ndarray, label: int) -> dict[str, Any]:
    """One webdataset sample of a token grid stack (n_crops, h, w) and its class."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: webdataset keys must not contain '.' or '/'")
    if tokens.ndim != 3 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"sample {key}: tokens must be integers (n_crops, h, w), got {tokens.dtype} {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(np.uint16).max):
        raise ValueError(f"sample {key}: token ids must fit uint16 (codebooks up to 65,536 entries)")
    return {"__key__": key, TOKENS: tokens.astype(np.uint16), LABEL: int(label)}


def decode_sample(sample: dict[str, Any], spec: SampleSpec, where: str) -> tuple[np.ndarray, int]:
    """Token grids (n_crops, h, w) and the label of one raw tar sample, checked against ``spec``.

    A missing or unparsable member is a broken file (``ValueError``/``KeyError``); a sample that
    parses but does not fit is a :class:`DataMismatch` naming ``where`` (the shard) and the key.
    """
    key = sample.get("__key__")
    tokens = np.load(io.BytesIO(sample[TOKENS]), allow_pickle=False)
    label_text = sample[LABEL]
    try:
        label = int(label_text)
    except ValueError:
        raise DataMismatch(f"{where}: sample {key}: class label {label_text!r} is not an integer") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataMismatch(f"{where}: sample {key}: tokens are {tokens.dtype}, token ids must be integers")
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != tuple(spec.grid):
        raise DataMismatch(f"{where}: sample {key} has tokens {tokens.shape}, manifest grid {spec.grid}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= spec.codebook_size:
        raise DataMismatch(
            f"{where}: sample {key}: token ids span [{low}, {high}], outside the codebook [0, {spec.codebook_size})"
        )
    if spec.model_classes is not None and label >= spec.model_classes:
        raise DataMismatch(
            f"{where}: sample {key}: class {label} outside [0, {spec.model_classes}) (model.num_classes: "
            f"{spec.model_classes}; index num_classes is the CFG null class, never a data label); "
            "set model.num_classes above the largest label"
        )
    if label < 0 or (spec.num_classes is not None and label >= spec.num_classes):
        raise DataMismatch(
            f"{where}: sample {key}: class {label} outside [0, {spec.num_classes}) of the manifest's num_classes "
            "(index num_classes is the CFG null class, never a data label)"
        )
    return tokens, label


def write_shard(path: str | Path, samples: Iterable[tuple[str, np.ndarray, int]]) -> int:
    """Write one tar of ``(key, tokens, label)`` samples atomically; return the sample count.

    Keys must be unique within the shard (a duplicate makes an invalid webdataset tar).
    """
    import webdataset as wds  # lazy: webdataset is a slow import; only tar reading/writing needs it

    count, seen = 0, set()

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0)  # fixed mtime: identical bytes when rewritten
            try:
                for key, tokens, label in samples:
                    if key in seen:
                        raise ValueError(f"{path}: duplicate sample key {key!r}")
                    seen.add(key)
                    writer.write(encode_sample(key, tokens, label))
                    count += 1
            except BaseException:
                # Closed now, or tarfile flushes into the closed file when collected (a full disk
                # would print a second error); the temp file is deleted anyway.
                with contextlib.suppress(Exception):
                    writer.close()
                raise
            writer.close()

    with storage_faults(Path(path).parent, f"cannot write shard {Path(path).name}"):  # a full disk: exit 5
        atomic_write(path, write)
    return count


def iter_samples(manifest: Manifest, spec: SampleSpec | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Every sample once, in shard order: ``(key, tokens (n_crops, h, w), label)``, checked."""
    # lazy: webdataset is a slow import; only tar reading/writing needs it
    from webdataset.tariterators import tarfile_samples

    spec = spec or SampleSpec.of(manifest)
    for url in manifest.urls:
        for sample in tarfile_samples([{"url": url}]):
            tokens, label = decode_sample(sample, spec, url)
            yield sample["__key__"], tokens, label


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
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, counts = [], []
    for s in range(num_shards):
        names.append(f"train-{s:06d}.tar")
        samples = [
            (f"{s:06d}_{i:06d}", rng.integers(0, vocab_size, (num_crops, grid, grid)), int(rng.integers(num_classes)))
            for i in range(per_shard)
        ]
        counts.append(write_shard(root / names[-1], samples))
    manifest = {
        "num_samples": sum(counts),
        "num_shards": num_shards,
        "shards": names,
        "shard_counts": counts,
        "grid": [grid, grid],
        "num_crops": num_crops,
        "codebook_size": vocab_size,
        "num_classes": num_classes,
        "tokenizer": {"kind": "synthetic"},
    }
    return write_manifest(root, manifest)
