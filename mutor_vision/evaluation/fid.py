"""The evaluation run: distributed sampling -> PNGs -> ADM npz -> features -> FID / IS / P / R.

``eval/fid.py`` is the command line around :func:`evaluate`; the demo calls it with its own
feature extractor. Ranks sample disjoint index slices of one fixed label list, extract features
of their own images, and rank 0 gathers them and computes the metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mutor_vision.config import to_dict
from mutor_vision.errors import ConfigError
from mutor_vision.evaluation.metrics import frechet_distance, inception_score, precision_recall, statistics
from mutor_vision.evaluation.pipeline import (
    Decode,
    extract_features,
    label_list,
    load_folder,
    png_path,
    sample_to_folder,
    save_grid,
)
from mutor_vision.files import atomic_write, atomic_write_json, check_stamp
from mutor_vision.models import GPT, SamplingConfig
from mutor_vision.processes import process_state

log = logging.getLogger(__name__)


def evaluation_state(device: str = "auto"):
    """The process state for evaluation: gloo on CPU, and a long collective timeout.

    Ranks can reach the gather at very different times (a resumed run leaves each rank a
    different number of missing samples): the NCCL default of 10 minutes would abort them.
    """
    return process_state(device, timeout=timedelta(hours=12))


@dataclass
class Reference:
    """Reference statistics (mu, sigma) and, for precision/recall, reference pool features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str


def reference_from_images(images: np.ndarray, extractor: torch.nn.Module, batch_size: int, device, source: str):
    pool = extract_features(extractor, images, batch_size, device)[0]
    stats = statistics(pool)
    return Reference(stats["mu"], stats["sigma"], pool, source)


def reference_from_npz(path: Path, extractor: torch.nn.Module, batch_size: int, device, cache_dir: Path) -> Reference:
    """ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``, ``arr_0``)."""
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: not an ADM reference batch (needs mu and sigma; has {list(data.keys())})")
        mu, sigma = data["mu"], data["sigma"]
        images = data.get("arr_0")
    features = None
    if images is not None:
        cache = cache_dir / f"{path.stem}-{_file_key(path)}-{images.shape[1]}px-adm-npz-{_name(extractor)}.npz"
        features = _cached_features(cache, lambda: extract_features(extractor, images, batch_size, device)[0])
    return Reference(mu, sigma, features, str(path))


def reference_from_folder(
    folder: Path,
    resolution: int,
    preprocess: Callable[[Image.Image, int], Image.Image],
    extractor: torch.nn.Module,
    batch_size: int,
    device,
    cache_dir: Path,
    preprocess_name: str = "adm-center-crop",
) -> Reference:
    """Reference images from a folder, ``preprocess``-ed to ``resolution``; features cached.

    The cache name encodes the folder, the resolution, the preprocessing and the extractor.
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise FileNotFoundError(f"{folder}: no reference images")
    key = hashlib.sha256("\n".join(f"{f}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:12]
    cache = cache_dir / f"{folder.name}-{key}-{resolution}px-{preprocess_name}-{_name(extractor)}.npz"

    def compute() -> np.ndarray:
        images = np.stack([np.asarray(preprocess(Image.open(f).convert("RGB"), resolution)) for f in files])
        return extract_features(extractor, images, batch_size, device)[0]

    features = _cached_features(cache, compute)
    stats = statistics(features)
    return Reference(stats["mu"], stats["sigma"], features, str(folder))


def _name(extractor: torch.nn.Module) -> str:
    return getattr(extractor, "name", type(extractor).__name__)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _cached_features(cache: Path, compute) -> np.ndarray:
    if cache.is_file():
        log.info("reference features from cache %s", cache)
        with np.load(cache) as data:
            return data["features"]
    features = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    # unique: two evaluations sharing a cache folder may write the same file at once.
    atomic_write(cache, lambda tmp: _save_npz(tmp, features=features), unique=True)
    return features


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as stream:  # a file object: numpy would append .npz to the temp name
        np.savez(stream, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as stream:
        np.save(stream, array)


def _weights_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights (sum and first elements of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().float().flatten()
        digest.update(f"{name}:{flat.sum().item():.6e}:{flat[:4].tolist()}".encode())
    return digest.hexdigest()[:16]


def write_npz(folder: Path, num_samples: int, path: Path) -> None:
    """ADM sample batch: ``arr_0`` uint8 (N, H, W, 3), written through a memmap (no N-image RAM peak)."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    npy = path.with_name(f".{path.stem}.arr_0.npy")
    array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(num_samples, *first.shape))
    for i in range(num_samples):
        array[i] = np.asarray(Image.open(png_path(folder, i)).convert("RGB"))
    array.flush()
    del array

    def archive(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipped:
            zipped.write(npy, "arr_0.npy")

    atomic_write(path, archive)
    npy.unlink()


def evaluate(
    model: GPT,
    decode: Decode,
    extractor: torch.nn.Module,
    reference: Reference | None,
    out_dir: Path,
    num_samples: int,
    sampling: SamplingConfig,
    per_class: bool = True,
    batch_size: int = 64,
    feature_batch_size: int = 64,
    save_npz: bool = True,
    compile: bool = False,
    extra: dict[str, Any] | None = None,
    extra_metrics=None,
    device: str = "auto",
) -> dict[str, Any] | None:
    """Sample ``num_samples`` images across ranks, then (rank 0) compute the metrics.

    Returns the results (also written to ``out_dir/results.json``) on rank 0, None elsewhere.
    ``extra_metrics(labels, features)`` may add entries (the demo's class-consistency accuracy).
    Samples already in ``out_dir/samples`` must come from the same model and settings
    (``sampling_settings.json``); a rerun samples only the missing or broken ones.
    """
    from accelerate.utils import gather_object

    state = evaluation_state(device)
    if num_samples < state.num_processes:
        raise ConfigError(f"num_samples ({num_samples}) must be at least the number of ranks ({state.num_processes})")
    model = model.to(state.device)
    out_dir = Path(out_dir)
    samples_dir = out_dir / "samples"
    settings = {
        "num_samples": num_samples,
        "per_class": per_class,
        **dataclasses.asdict(sampling),
        "model": {"config": to_dict(model.config), "checksum": _weights_checksum(model)},
    }
    stamp = (out_dir / "sampling_settings.json", settings, any(samples_dir.glob("*.png")))
    remedy = "use another --out, or delete it to start over"
    check_stamp(*stamp, remedy=remedy, write=False)  # every rank checks, the main process records
    if state.is_main_process:
        check_stamp(*stamp, remedy=remedy, write=True)
    state.wait_for_everyone()
    labels = label_list(num_samples, model.config.num_classes, per_class=per_class, seed=sampling.seed)
    mine = np.arange(num_samples)[state.process_index :: state.num_processes]
    start = time.perf_counter()
    written = sample_to_folder(
        model,
        decode,
        labels,
        mine,
        samples_dir,
        batch_size,
        sampling,
        compile=compile,
        show_progress=state.is_local_main_process,
    )
    sampling_s = time.perf_counter() - start
    state.wait_for_everyone()
    images = np.stack([np.asarray(Image.open(png_path(samples_dir, int(i))).convert("RGB")) for i in mine])
    features = extract_features(extractor, images, feature_batch_size, state.device)
    gathered = gather_object([(mine, features, written)])
    if not state.is_main_process:
        return None
    order = np.concatenate([g[0] for g in gathered])
    inverse = np.argsort(order)
    if not np.array_equal(order[inverse], np.arange(num_samples)):
        raise RuntimeError("ranks did not cover every sample index exactly once")
    features = [np.concatenate([g[1][j] for g in gathered])[inverse] for j in range(len(gathered[0][1]))]
    pool, logits = features[0], (features[1] if len(features) > 1 else None)
    results: dict[str, Any] = {
        "num_samples": num_samples,
        "written_this_run": int(sum(g[2] for g in gathered)),
        "per_rank": [len(g[0]) for g in gathered],
        "world_size": state.num_processes,
        "sampling": {
            **dataclasses.asdict(sampling),
            "labels": "per-class" if per_class else "random",
            "batch_size": batch_size,
        },
        "features": {"extractor": _name(extractor), "batch_size": feature_batch_size, "tf32": False},
        "sampling_seconds_this_run": sampling_s,
        **(extra or {}),
    }
    metrics: dict[str, float] = {}
    if reference is not None:
        metrics["fid"] = frechet_distance(statistics(pool), {"mu": reference.mu, "sigma": reference.sigma})
        if reference.features is not None:
            metrics["precision"], metrics["recall"] = precision_recall(pool, reference.features, k=3)
        results["reference"] = reference.source
    if logits is not None and num_samples >= 10:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, splits=10)
    if extra_metrics is not None:
        metrics.update(extra_metrics(labels, (pool, logits)))
    results["metrics"] = metrics
    atomic_write(out_dir / "labels.npy", lambda tmp: _save_npy(tmp, labels))
    if save_npz:
        write_npz(samples_dir, num_samples, out_dir / "samples.npz")
    save_grid(load_folder(samples_dir, min(num_samples, 64)), out_dir / "grid.png")
    atomic_write_json(out_dir / "results.json", results)
    log.info("metrics: %s", json.dumps(metrics))
    return results
