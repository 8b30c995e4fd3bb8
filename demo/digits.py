"""The demo's data and its evaluation network: scikit-learn's handwritten digits (the 1,797 8×8
images that come inside the scikit-learn package: no download) brought to a 16×16 grid, written as
an ImageFolder, and a small CNN classifier registered with torch-fidelity as a custom feature
extractor (it stands in for Inception, which knows nothing of 16×16 digits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from tqdm.auto import tqdm

EXTRACTOR_NAME = "demo-digits-cnn"
SIZE = 16  # the image side: a 16×16 token grid, as LlamaGen's 256-px VQ-16 grid


def load_digits_rgb(test_fraction: float = 0.2, seed: int = 0, size: int = SIZE):
    """(train_images, train_labels, test_images, test_labels): uint8 (N, size, size, 3), stratified split.

    The 8×8 digits (17 grey levels) are upsampled with a bicubic filter: smooth strokes whose
    neighbouring pixels depend on each other, as in natural images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)
    if size != gray.shape[1]:
        gray = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)) for g in gray])
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    split = train_test_split(rgb, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)
    train_x, test_x, train_y, test_y = split
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


SHIFTS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0))  # the training copies: as is, and one pixel each way


def shifted(images: np.ndarray, labels: np.ndarray, offsets=SHIFTS):
    """Augmentation: every image moved by each (dy, dx) of ``offsets`` (at most 1 pixel), black filling in."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    moved = [padded[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width] for dy, dx in offsets]
    return np.concatenate(moved), np.tile(labels, len(offsets))


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """PNG ImageFolder: root/<class>/<index>.png (class folders sort in label order)."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


class DigitsCNN(nn.Module):
    """Two conv layers, each followed by 2×2 pooling, and a 64-d feature layer; logits over 10 digits."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (size // 4) ** 2, 64)
        self.head = nn.Linear(64, 10)

    def features(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_uint8.float() / 127.5 - 1.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        pool = F.relu(self.fc(x.flatten(1)))
        return pool, self.head(pool)


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN(images.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="digits classifier", unit="epoch"):
        for batch in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model.features(x[batch])[1], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: ``pool`` (64-d features for FID, P/R) and ``logits`` (for IS)."""

    def __init__(self, name: str, features_list: list[str], classifier: DigitsCNN | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        self.classifier = classifier or DigitsCNN()
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "pool", "isc": "logits", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pool, logits = self.classifier.features(images)
        found = {"pool": pool, "logits": logits}
        return tuple(found[name] for name in self.features_list)


def digits_extractor(classifier: DigitsCNN) -> DigitsFeatureExtractor:
    """The registered extractor, built through torch-fidelity's registry like any other."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
    return create_feature_extractor(EXTRACTOR_NAME, ["pool", "logits"], cuda=False, classifier=classifier)
