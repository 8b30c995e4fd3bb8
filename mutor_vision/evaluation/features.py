"""Features of images: the Inception extractor, feature extraction, and reference sets (cached).

Extractors are torch-fidelity extractors (Inception-v3-compat for ImageNet, a registered custom
one for the demo): uint8 (B, 3, H, W) in, one tensor per requested feature out. Features are kept
as float32 (what the extractor computes; the statistics cast to float64 exactly).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mutor_vision.evaluation.metrics import statistics
from mutor_vision.files import atomic_write

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class Reference:
    """Reference statistics (mu, sigma) and, for precision/recall, reference pool features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str


def inception_extractor(weights: str | Path | None = None, allow_download: bool = False) -> torch.nn.Module:
    """torch-fidelity's Inception-v3-compat with the ``2048`` pool and ``logits_unbiased`` features.

    Never reaches the network unless ``allow_download``: without a weights file it looks in the
    torch hub cache, and otherwise stops with the two ways to supply the weights.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if cached.is_file():
            weights = cached
        elif not allow_download:
            raise FileNotFoundError(
                f"Inception weights not found and downloading is off. Either pass --inception-weights "
                f"PATH/{INCEPTION_FILE}, or put that file at {cached} (the torch hub cache, $TORCH_HOME); "
                "--download-inception fetches it from torch-fidelity's release when a network is available."
            )
    elif not Path(weights).is_file():
        raise FileNotFoundError(f"--inception-weights {weights}: no such file")
    return FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(weights) if weights else None,
    )


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3-compat with *random* weights, saved as a weights file.

    For tests and benchmarks of the pipeline without the real file (no network): every number
    computed with it is meaningless and must never be reported.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    saved = (inception.load_state_dict_from_url, cls.load_state_dict)
    # Build the network without its download: no weights are fetched, the init stays random.
    inception.load_state_dict_from_url = lambda *args, **kwargs: {}
    cls.load_state_dict = lambda self, state: None
    try:
        torch.manual_seed(seed)
        model = cls("inception-v3-compat", ["2048"])
    finally:
        inception.load_state_dict_from_url, cls.load_state_dict = saved
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return Path(path)


def extractor_name(extractor: torch.nn.Module) -> str:
    return getattr(extractor, "name", type(extractor).__name__)


@torch.no_grad()
def features_of(extractor: torch.nn.Module, images: Tensor, batch_size: int) -> list[np.ndarray]:
    """Features of uint8 images (B, 3, H, W) already on the extractor's device; one float32 array per feature.

    TF32 is off (cuDNN TF32 on Hopper makes features depend on the batch size,
    docs/architecture.md), so in-memory images and their PNG files give the same features.
    """
    outputs: list[list[np.ndarray]] = []
    with _no_tf32():
        for start in range(0, len(images), batch_size):
            features = extractor(images[start : start + batch_size])
            features = features if isinstance(features, tuple | list) else (features,)
            if not outputs:
                outputs = [[] for _ in features]
            for store, feature in zip(outputs, features, strict=True):
                store.append(feature.float().cpu().numpy())
    return [np.concatenate(parts) for parts in outputs]


def extract_features(
    extractor: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    desc: str = "features",
) -> list[np.ndarray]:
    """:func:`features_of` over uint8 images (N, H, W, 3) held in host memory, batch by batch."""
    extractor = extractor.to(device).eval()
    parts: list[list[np.ndarray]] = []
    for start in tqdm(range(0, len(images), batch_size), disable=not show_progress, desc=desc, unit="batch"):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        features = features_of(extractor, batch.to(device), batch_size)
        parts = parts or [[] for _ in features]
        for store, feature in zip(parts, features, strict=True):
            store.append(feature)
    return [np.concatenate(p) for p in parts]


@contextlib.contextmanager
def _no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_from_images(
    images: np.ndarray, extractor: torch.nn.Module, batch_size: int, device, source: str
) -> Reference:
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
        cache = cache_dir / f"{path.stem}-{_file_key(path)}-{images.shape[1]}px-adm-npz-{extractor_name(extractor)}.npz"
        features = _cached_features(
            cache, lambda: extract_features(extractor, images, batch_size, device, True, "reference features")[0]
        )
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
    cache = cache_dir / f"{folder.name}-{key}-{resolution}px-{preprocess_name}-{extractor_name(extractor)}.npz"

    def compute() -> np.ndarray:
        images = np.stack([np.asarray(preprocess(Image.open(f).convert("RGB"), resolution)) for f in files])
        return extract_features(extractor, images, batch_size, device, True, "reference features")[0]

    features = _cached_features(cache, compute)
    stats = statistics(features)
    return Reference(stats["mu"], stats["sigma"], features, str(folder))


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

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: numpy would append .npz to the temp name
            np.savez(stream, features=features)

    # unique: two evaluations sharing a cache folder may write the same file at once.
    atomic_write(cache, save, unique=True)
    return features
