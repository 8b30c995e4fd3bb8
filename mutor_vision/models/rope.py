"""LlamaGen's 2D rotary position embedding (docs/compatibility.md §1, "2D RoPE").

The table has one row per sequence position: row 0 is the class token, rows 1..N the grid cells
in raster order. Cell (i, j) rotates the first half of the head's pairs by the row index and the
second half by the column index; pairs are interleaved, (x[2m], x[2m+1]).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (1 + grid_size², head_dim // 2) float32.

    Row 0 is all zeros for both cos and sin — LlamaGen's quirk, kept for checkpoint compatibility:
    the class token's q and k are zero vectors in every layer (it is still attended, with score 0).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) * 4 / head_dim)  # 10000^(-2k/(head_dim/2))
    index = torch.arange(grid_size, dtype=torch.float32)
    rows = torch.outer(index, freqs)[:, None, :].expand(-1, grid_size, -1)  # (g, g, quarter): row angle
    cols = torch.outer(index, freqs)[None, :, :].expand(grid_size, -1, -1)  # (g, g, quarter): column angle
    angles = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # (g², head_dim // 2), raster order
    zero_row = torch.zeros(1, head_dim // 2)
    return torch.cat([zero_row, angles.cos()]), torch.cat([zero_row, angles.sin()])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` (B, H, T, D) in float32; cos/sin (T, D/2) or (B, 1, T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)
