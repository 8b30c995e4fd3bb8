"""Features of images: the Inception extractor, feature extraction, and reference sets (cached).

Extractors are torch-fidelity extractors (Inception-v3-compat for ImageNet, a registered custom
one for the demo): uint8 (B, 3, H, W) in, one tensor per requested feature out. Features are kept
as float32 (what the extractor computes; the statistics cast to float64 exactly).

Cached reference features are keyed by everything that decides them — the reference's bytes, the
extractor's weights (a digest of its state dict), the resolution, the preprocessing and
``FEATURES_VERSION`` — never by a name: other weights or another reference always miss the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mutor_vision.errors import ConfigError, InputError
from mutor_vision.evaluation.metrics import statistics
from mutor_vision.files import atomic_write, file_sha256

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
RANDOM_WEIGHTS = "random:"  # --inception-weights random:SEED: a smoke test of the pipeline, numbers meaningless
# Part of every cache key: bump when the features computed for an image change (extractor call,
# dtype, TF32, image decoding), so caches written by older code are never served.
FEATURES_VERSION = 2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass
class Reference:
    """Reference statistics (mu, sigma) and, for precision/recall, reference pool features.

    ``sha256`` identifies the reference's content (the npz file's bytes; for a folder, every image's
    name, size and bytes); ``skipped`` counts folder images that could not be read."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str
    sha256: str = ""
    skipped: int = 0

    def record(self) -> dict[str, Any]:
        """What results.json says of the reference."""
        return {"source": self.source, "sha256": self.sha256, "skipped_images": self.skipped}


def inception_extractor(weights: str | Path | None = None, allow_download: bool = False) -> torch.nn.Module:
    """torch-fidelity's Inception-v3-compat with the ``2048`` pool and ``logits_unbiased`` features.

    Never reaches the network unless ``allow_download``: without a weights file it looks in the
    torch hub cache, and otherwise stops with the two ways to supply the weights. ``random:SEED``
    builds the network with random weights (a smoke test of the pipeline: the numbers it gives are
    meaningless, and results say so). The extractor carries ``weights_info``: where its weights
    came from, their file's sha256, and whether they are random.
    """
    # lazy: torch-fidelity is a slow import
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if isinstance(weights, str) and weights.startswith(RANDOM_WEIGHTS):
        seed = weights[len(RANDOM_WEIGHTS) :]
        if not seed.isdigit():
            raise ConfigError(f"--inception-weights {weights}: expected random:SEED with an integer SEED")
        with tempfile.TemporaryDirectory() as tmp:
            path = save_random_inception_weights(Path(tmp) / INCEPTION_FILE, seed=int(seed))
            extractor = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
            extractor.weights_info = {"weights": weights, "sha256": file_sha256(path), "random": True}
        return extractor
    path = find_inception_weights(weights, allow_download)
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(path) if path else None,
    )
    if path is None:  # downloaded by torch-fidelity into the hub cache
        path = hub_inception_path()
    sha256 = file_sha256(path) if path.is_file() else None
    extractor.weights_info = {"weights": str(path), "sha256": sha256, "random": False}
    return extractor


def hub_inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(weights: str | Path | None, allow_download: bool = False) -> Path | None:
    """The Inception weights file to load (None: torch-fidelity downloads it); a clear error when absent."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--inception-weights {weights}: no such file")
        return Path(weights)
    cached = hub_inception_path()
    if cached.is_file():
        return cached
    if allow_download:
        return None
    raise FileNotFoundError(
        f"Inception weights not found and downloading is off. Either pass --inception-weights "
        f"PATH/{INCEPTION_FILE}, or put that file at {cached} (the torch hub cache, $TORCH_HOME); "
        "--download-inception fetches it from torch-fidelity's release when a network is available; "
        "--inception-weights random:0 runs the pipeline with random weights (meaningless numbers)."
    )


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3-compat with *random* weights, saved as a weights file.

    For tests and benchmarks of the pipeline without the real file (no network): every number
    computed with it is meaningless and must never be reported.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception  # lazy: torch-fidelity is a slow import

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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return Path(path)


def extractor_name(extractor: torch.nn.Module) -> str:
    return getattr(extractor, "name", type(extractor).__name__)


def extractor_digest(extractor: torch.nn.Module) -> str:
    """sha256 of the extractor's state dict (names, dtypes, shapes, bytes): what its features depend on.

    Remembered on the module while no tensor changed (same storage, same version counter: an
    in-place update bumps it), since hashing all of Inception's weights at every call is not free.
    """
    state = sorted(extractor.state_dict().items())
    witness = tuple((name, t.data_ptr(), t._version, t.device.type) for name, t in state)
    remembered = getattr(extractor, "_mutor_digest", None)
    if remembered is not None and remembered[0] == witness:
        return remembered[1]
    digest = hashlib.sha256(extractor_name(extractor).encode())
    for name, tensor in state:
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, any dtype
    extractor._mutor_digest = (witness, digest.hexdigest())
    return digest.hexdigest()


def extractor_record(extractor: torch.nn.Module) -> dict[str, Any]:
    """What results.json says of the extractor: name, weights, their sha256, randomness, digest, version."""
    info = getattr(extractor, "weights_info", {})
    return {
        "extractor": extractor_name(extractor),
        "weights": info.get("weights"),
        "weights_sha256": info.get("sha256"),
        "random_weights": bool(info.get("random", False)),
        "state_dict_sha256": extractor_digest(extractor),
        "features_version": FEATURES_VERSION,
    }


@torch.no_grad()
def features_of(extractor: torch.nn.Module, images: Tensor, batch_size: int) -> list[np.ndarray]:
    """Features of uint8 images (B, 3, H, W) already on the extractor's device; one float32 array per feature.

    TF32 is off (cuDNN TF32 on Hopper makes features depend on the batch size,
    docs/architecture.md), so in-memory images and their PNG files give the same features.
    """
    return [feature.cpu().numpy() for feature in features_on_device(extractor, images, batch_size)]


@torch.no_grad()
def features_on_device(extractor: torch.nn.Module, images: Tensor, batch_size: int) -> list[Tensor]:
    """:func:`features_of` left on the images' device (float32, one tensor per feature): no host sync.

    The extractor runs on ``batch_size`` images at a time, TF32 off, on the current stream.
    """
    outputs: list[list[Tensor]] = []
    with _no_tf32():
        for start in range(0, len(images), batch_size):
            features = extractor(images[start : start + batch_size])
            features = features if isinstance(features, tuple | list) else (features,)
            if not outputs:
                outputs = [[] for _ in features]
            for store, feature in zip(outputs, features, strict=True):
                store.append(feature.float())
    return [torch.cat(parts) for parts in outputs]


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
    sha256 = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    return Reference(stats["mu"], stats["sigma"], pool, source, sha256)


def reference_from_npz(path: Path, extractor: torch.nn.Module, batch_size: int, device, cache_dir: Path) -> Reference:
    """ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``, ``arr_0``)."""
    path = Path(path)
    data = read_reference_npz(path)
    mu, sigma, images = data["mu"], data["sigma"], data.get("arr_0")
    sha256 = file_sha256(path)
    features = None
    if images is not None:
        key = {"reference_sha256": sha256, "resolution": int(images.shape[1]), "preprocess": "adm-npz"}
        features, _ = _cached_features(
            cache_dir,
            path.stem,
            key,
            extractor,
            lambda: (extract_features(extractor, images, batch_size, device, True, "reference features")[0], 0),
        )
    return Reference(mu, sigma, features, str(path), sha256)


def read_reference_npz(path: Path) -> dict[str, np.ndarray]:
    """An ADM reference batch's arrays; a one-line error naming ``--ref-batch`` and what the file lacks."""
    if not path.is_file():
        raise InputError(f"--ref-batch {path}: no such file")
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            missing = [key for key in ("mu", "sigma") if key not in keys]
            if missing:
                raise InputError(
                    f"--ref-batch {path}: not an ADM reference batch: it lacks {' and '.join(missing)} "
                    f"(it holds {keys or 'no arrays'}; ADM's VIRTUAL_imagenet256_labeled.npz has mu, sigma, arr_0)"
                )
            return {key: data[key] for key in ("mu", "sigma", "arr_0") if key in keys}
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"--ref-batch {path}: not a readable .npz file ({type(error).__name__})") from None


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

    Images that cannot be read are skipped, counted and named in the log (as the encoder does).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--ref-folder {folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--ref-folder {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sha256 = folder_sha256(folder, files)

    def compute() -> tuple[np.ndarray, int]:
        images, skipped = [], []
        for file in tqdm(files, desc="reference images", unit="image", disable=len(files) < 1000):
            try:
                with Image.open(file) as image:
                    images.append(np.asarray(preprocess(image.convert("RGB"), resolution)))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                skipped.append(f"{file.relative_to(folder)} ({type(error).__name__})")
        if skipped:
            log.warning(
                "--ref-folder %s: %d of %d images could not be read and are left out (first: %s)",
                folder, len(skipped), len(files), "; ".join(skipped[:3]),
            )  # fmt: skip
        if not images:
            raise InputError(f"--ref-folder {folder}: none of its {len(files)} images could be read")
        pool = extract_features(extractor, np.stack(images), batch_size, device, True, "reference features")[0]
        return pool, len(skipped)

    key = {"reference_sha256": sha256, "resolution": resolution, "preprocess": preprocess_name}
    features, skipped = _cached_features(cache_dir, folder.name, key, extractor, compute)
    stats = statistics(features)
    return Reference(stats["mu"], stats["sigma"], features, str(folder), sha256, skipped)


def folder_sha256(folder: Path, files: list[Path]) -> str:
    """The content of a reference folder: every image's relative name, size and bytes, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _cached_features(
    cache_dir: Path,
    label: str,
    key: dict[str, Any],
    extractor: torch.nn.Module,
    compute: Callable[[], tuple[np.ndarray, int]],
) -> tuple[np.ndarray, int]:
    """(features, images skipped) from ``cache_dir`` when an entry with exactly this key exists, else
    ``compute()``-d and cached.

    The key is ``key`` plus the extractor's name and state-dict digest and ``FEATURES_VERSION``; the
    file name holds its hash and the file holds the key itself, checked on every read.
    """
    key = {**key, "extractor": extractor_name(extractor), "extractor_sha256": extractor_digest(extractor)}
    key["features_version"] = FEATURES_VERSION
    text = json.dumps(key, sort_keys=True)
    name = f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"
    cache = Path(cache_dir) / name
    if cache.is_file():
        try:
            with np.load(cache) as data:
                if str(data["key"]) == text:
                    log.info("reference features from cache %s", cache)
                    return data["features"], int(data["skipped"])
            log.warning("%s: its key differs from this evaluation's: computing the features again", cache)
        except (OSError, ValueError, KeyError, EOFError):
            log.warning("%s: unreadable cache entry: computing the features again", cache)
    features, skipped = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: numpy would append .npz to the temp name
            np.savez(stream, features=features, key=np.array(text), skipped=np.array(skipped))

    # unique: two evaluations sharing a cache folder may write the same file at once.
    atomic_write(cache, save, unique=True)
    return features, skipped
