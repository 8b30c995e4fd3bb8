"""Sampling for evaluation: labels -> codes -> images (PNG, resumable) -> ADM npz -> features.

The tokenizer stays outside the library: callers pass ``decode``, codes (B, h, w) -> uint8
images (B, 3, H, W), e.g. ``to_uint8(vq.decode(codes))`` from ``tokenizer/``. Feature
extractors are torch-fidelity extractors (Inception-v3-compat for ImageNet, a registered custom
one for the demo): uint8 (B, 3, H, W) in, one tensor per requested feature out.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mutor_vision.files import atomic_write
from mutor_vision.models import GPT, SamplingConfig, generate, sample_uniforms

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
Decode = Callable[[Tensor], Tensor]


def label_list(num_samples: int, num_classes: int, per_class: bool = True, seed: int = 0) -> np.ndarray:
    """Sample i's class: ``i % num_classes`` (balanced: 50 per class for 50,000 / 1,000) or uniform."""
    if per_class:
        return np.arange(num_samples) % num_classes
    return np.random.default_rng(seed).integers(0, num_classes, num_samples)


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def missing_indices(folder: Path, indices: np.ndarray, verify: bool = False) -> list[int]:
    """Indices whose PNG is absent; with ``verify``, also those whose PNG does not decode (deleted)."""
    missing = [int(i) for i in indices if not png_path(folder, int(i)).is_file()]
    if not verify:
        return missing
    present = sorted(set(int(i) for i in indices) - set(missing))
    with ThreadPoolExecutor(8) as pool:
        decodes = list(pool.map(lambda i: _decodes(png_path(folder, i)), present))
    broken = [i for i, ok in zip(present, decodes, strict=True) if not ok]
    for index in broken:
        log.warning("%s does not decode: deleted, it will be sampled again", png_path(folder, index))
        png_path(folder, index).unlink(missing_ok=True)
    return sorted(missing + broken)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # any decoder error: truncated, garbage, wrong format
        return False


def sample_to_folder(
    model: GPT,
    decode: Decode,
    labels: np.ndarray,
    indices: np.ndarray,
    folder: Path,
    batch_size: int,
    sampling: SamplingConfig,
    compile: bool = False,
    show_progress: bool = True,
) -> int:
    """Sample every index of ``indices`` whose PNG is missing or broken; return how many were written.

    Each PNG is written to a temp name and renamed, so a kill never leaves a half-written image
    that a rerun would count; PNGs already there are decoded once before they are trusted. Image
    i's random numbers derive from (seed, i) alone, so a rerun reproduces exactly the images an
    uninterrupted run would have written, whatever batches they fall into.
    """
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing_indices(folder, indices, verify=True)
    device = next(model.parameters()).device
    written = 0
    for start in tqdm(range(0, len(todo), batch_size), disable=not show_progress, unit="batch", desc="sampling"):
        batch = todo[start : start + batch_size]
        codes = generate(
            model,
            torch.as_tensor(labels[batch], device=device),
            sampling,
            uniform=sample_uniforms(sampling.seed, batch, model.config.num_tokens),
            compile=compile,
        )
        with torch.no_grad():
            images = decode(codes).permute(0, 2, 3, 1).cpu().numpy()
        for index, image in zip(batch, images, strict=True):
            # Not flushed to disk one by one (50,000 fsyncs): a PNG lost to a power cut fails to
            # decode, and the next run samples it again.
            atomic_write(
                png_path(folder, index),
                lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"),
                durable=False,
            )
            written += 1
    return written


def load_folder(folder: Path, num_samples: int) -> np.ndarray:
    """All PNGs 0..num_samples-1 as uint8 (N, H, W, 3); an error names any gap."""
    missing = missing_indices(folder, np.arange(num_samples))
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} sample(s) missing, e.g. {missing[:5]}")
    return np.stack([np.asarray(Image.open(png_path(folder, i)).convert("RGB")) for i in range(num_samples)])


def iter_uint8_batches(images: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[np.ndarray]:
    """Run a torch-fidelity extractor over uint8 images (N, H, W, 3); one float64 array per feature.

    TF32 is off while extracting (cuDNN TF32 on Hopper makes features batch-size dependent,
    toshas/torch-fidelity#43).
    """
    extractor = extractor.to(device).eval()
    outputs: list[list[np.ndarray]] = []
    with _no_tf32():
        for batch in tqdm(iter_uint8_batches(images, batch_size), disable=not show_progress, desc="features"):
            features = extractor(batch.to(device))
            features = features if isinstance(features, tuple | list) else (features,)
            if not outputs:
                outputs = [[] for _ in features]
            for store, feature in zip(outputs, features, strict=True):
                store.append(feature.double().cpu().numpy())
    return [np.concatenate(parts) for parts in outputs]


@contextlib.contextmanager
def _no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """A PNG grid of uint8 images (N, H, W, 3)."""
    from torchvision.utils import make_grid

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    grid = make_grid(tensor, nrow=columns, padding=2, pad_value=255)
    atomic_write(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
