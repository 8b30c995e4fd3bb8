"""Image preprocessing shared by every tokenizer (docs/compatibility.md §2, "Preprocessing").

ADM centre crop: while the short side >= 2·size, halve with BOX; resize the short side to
``size`` with BICUBIC; centre-crop size×size. Model inputs are in [-1, 1]; decoded images go back
to uint8 with clamp(127.5·x + 128, 0, 255) (ADM / LlamaGen).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CropMode = Literal["adm-flip", "ten-crop", "center"]
TEN_CROP_RANGE = 1.1  # LlamaGen: centre-crop to 1.1·size, then torchvision's TenCrop(size)


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop of a PIL image to size×size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return Image.fromarray(array[top : top + size, left : left + size])


def crops(image: Image.Image, size: int, mode: CropMode = "adm-flip") -> list[Image.Image]:
    """The training crops of one image: ADM centre crop + its mirror (paper), or LlamaGen's ten-crop."""
    image = image.convert("RGB")
    if mode == "adm-flip":
        crop = center_crop_adm(image, size)
        return [crop, crop.transpose(Image.FLIP_LEFT_RIGHT)]
    if mode == "center":  # one ADM centre crop, no mirror (small demos, mirror-sensitive data)
        return [center_crop_adm(image, size)]
    if mode == "ten-crop":
        from torchvision.transforms.functional import ten_crop

        return list(ten_crop(center_crop_adm(image, int(size * TEN_CROP_RANGE)), size))
    raise ValueError(f"crop mode must be 'adm-flip', 'ten-crop' or 'center', got {mode!r}")


def num_crops(mode: CropMode) -> int:
    return {"adm-flip": 2, "ten-crop": 10, "center": 1}[mode]


def to_model_input(images: list[Image.Image] | np.ndarray) -> Tensor:
    """RGB images (PIL list, or uint8 array (B, H, W, 3)) -> float tensor (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im.convert("RGB")) for im in images]) if isinstance(images, list) else images
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Decoded images in [-1, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), as ADM and LlamaGen."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
