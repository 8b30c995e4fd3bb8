"""A palette tokenizer: iGPT-style colour quantisation, one token per pixel.

A k-means codebook of RGB colours fitted on data; ``encode`` maps each pixel to its nearest
colour, ``decode`` paints the colours back. Same interface as :class:`tokenizer.vq16.VQ16`
(images in [-1, 1] (B, 3, H, W) <-> codes (B, H, W)), saved as a small JSON file. It is how the
demo and the tests get real token grids without pretrained weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class PaletteTokenizer:
    downsample = 1

    def __init__(self, palette: np.ndarray) -> None:
        palette = np.asarray(palette)
        if palette.ndim != 2 or palette.shape[1] != 3 or palette.dtype != np.uint8 or len(palette) < 1:
            raise ValueError(f"palette must be uint8 (K, 3), got {palette.dtype} {palette.shape}")
        self.palette = palette
        self.colors = torch.from_numpy(palette.astype(np.float32)) / 127.5 - 1.0  # (K, 3) in [-1, 1]

    @property
    def vocab_size(self) -> int:
        return len(self.palette)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.palette.tobytes()).hexdigest()

    @classmethod
    def fit(cls, pixels: np.ndarray, num_colors: int, seed: int = 0, iterations: int = 30) -> PaletteTokenizer:
        """k-means (k-means++ init, Lloyd steps) over uint8 RGB pixels (..., 3)."""
        data = torch.from_numpy(np.asarray(pixels, dtype=np.uint8).reshape(-1, 3).astype(np.float32))
        unique = torch.unique(data, dim=0)
        if len(unique) <= num_colors:  # few colours: the palette is exact
            return cls(unique.round().to(torch.uint8).numpy())
        g = torch.Generator().manual_seed(seed)
        centers = unique[torch.randint(len(unique), (1,), generator=g)]
        for _ in range(1, num_colors):  # k-means++: next centre drawn proportional to squared distance
            dist = torch.cdist(unique, centers).min(dim=1).values.pow(2)
            centers = torch.cat([centers, unique[torch.multinomial(dist, 1, generator=g)]])
        for _ in range(iterations):
            assign = torch.cdist(data, centers).argmin(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, assign, data)
            counts = torch.bincount(assign, minlength=num_colors).unsqueeze(1)
            centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        return cls(centers.round().clamp(0, 255).to(torch.uint8).numpy())

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> nearest palette index (B, H, W) long."""
        flat = images.permute(0, 2, 3, 1).reshape(-1, 3).float()
        index = torch.cdist(flat, self.colors.to(flat.device)).argmin(dim=1)
        return index.view(images.shape[0], images.shape[2], images.shape[3])

    def decode(self, codes: Tensor) -> Tensor:
        """(B, H, W) codes -> (B, 3, H, W) palette colours in [-1, 1]."""
        return self.colors.to(codes.device)[codes].permute(0, 3, 1, 2).contiguous()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "palette", "palette": self.palette.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> PaletteTokenizer:
        try:
            data = json.loads(Path(path).read_text())
            return cls(np.array(data["palette"], dtype=np.uint8))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a palette tokenizer file ({error})") from None

    from_pretrained = load
