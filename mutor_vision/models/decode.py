"""How the one-token decode attends over the static KV cache (``GPT.decode``, ``sampling.py``).

At sequence position t the query attends to cache slots 0..t; the slots past t hold zeros or stale
tokens of an earlier sequence and must never be seen. Every setting below computes exactly that;
they differ in the kernel and in how much of the cache it reads:

- ``sdpa``: SDPA with a dense bool mask over the slots read (on CUDA the memory-efficient kernel,
  since the mask rules out flash and cuDNN is avoided: ``gpt.py``).
- ``math``: explicit attention — q·kᵀ as a product and sum over the head dimension, the masked
  softmax in float32, then the probability-weighted sum of v — which inductor fuses into a few
  reductions that read K and V once each.
- ``flex``: FlexAttention with a BlockMask, built from t inside the step, that lists only the KV
  blocks up to t. Compiled, inductor runs its flex-decoding kernel, which never reads the blocks
  past t: one graph serves every step. (Eager, flex runs its unfused reference.)

``bucket`` (sdpa, math) reads only the first ceil((t+1)/bucket)·bucket slots. That length is a
Python int chosen outside the compiled step (:meth:`DecodeAttention.kv_len`), so each bucket is
its own static-shape graph: N / bucket graphs, compiled once, none per step.

:func:`graph_default` is the setting a compiled CUDA decode uses unless told otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

DecodeKernel = Literal["sdpa", "math", "flex"]
KERNELS = ("sdpa", "math", "flex")


@dataclass(frozen=True)
class DecodeAttention:
    """The decode's attention kernel and how much of the cache it reads (the module docstring).

    Frozen and hashable: the compiled step (``sampling.next_codes``) takes it as a constant.
    """

    kernel: DecodeKernel = "sdpa"
    bucket: int = 0  # sdpa, math: read ceil((t+1)/bucket)·bucket slots (one graph per bucket); 0: all N
    flex_block: int = 64  # flex: the KV block size; the kernel skips the blocks past t

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"decode attention kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.bucket < 0 or (self.bucket and self.kernel == "flex"):
            raise ValueError(f"bucket must be >= 0 and only with sdpa or math (flex skips blocks itself), got {self}")
        if self.flex_block < 16 or self.flex_block & (self.flex_block - 1):
            raise ValueError(f"flex_block must be a power of two >= 16 (the decoding kernel's tiles), got {self}")

    @classmethod
    def parse(cls, name: str) -> DecodeAttention:
        """``sdpa``, ``math``, ``flex``, ``<sdpa|math>+bucket<b>`` or ``flex+block<b>``."""
        match = re.fullmatch(r"(sdpa|math|flex)(?:\+(bucket|block)(\d+))?", name)
        if match is None or (match[2] == "block") != (match[1] == "flex" and match[2] is not None):
            raise ValueError(f"unknown decode attention {name!r}: sdpa, math, flex, sdpa+bucket64, flex+block32, ...")
        kernel, option, size = match.groups()
        if option == "bucket":
            return cls(kernel, bucket=int(size))
        return cls(kernel, flex_block=int(size)) if option else cls(kernel)

    @property
    def name(self) -> str:
        """The :meth:`parse` spelling."""
        if self.bucket:
            return f"{self.kernel}+bucket{self.bucket}"
        if self.kernel == "flex" and self.flex_block != 64:
            return f"flex+block{self.flex_block}"
        return self.kernel

    def kv_len(self, position: int, max_len: int) -> int:
        """The cache slots the query at ``position`` reads: its bucket's end, or all ``max_len``."""
        if not self.bucket:
            return max_len
        return min(max_len, -(-(position + 1) // self.bucket) * self.bucket)

    def mask(self, input_pos: Tensor, max_len: int, kv_len: int | None = None) -> DecodeMask:
        """The step's :class:`DecodeMask` for the one query at ``input_pos`` (1,), traceable (no host sync).

        ``kv_len`` is :meth:`kv_len` of the position (all ``max_len`` slots when None); it must exceed it.
        """
        if self.kernel == "flex":
            return DecodeMask("flex", max_len, flex_decode_mask(input_pos, max_len, self.flex_block))
        kv_len = max_len if kv_len is None else kv_len
        slots = torch.arange(kv_len, device=input_pos.device)
        return DecodeMask(self.kernel, kv_len, (slots[None, :] <= input_pos[:, None])[None, None])


EAGER_DEFAULT = DecodeAttention()  # sdpa over the whole cache: the eager decode (as before there was a choice)


def graph_default() -> DecodeAttention:
    """The decode attention of a compiled CUDA decode (``generate(compile=True)``; eager runs ``sdpa``).

    flex, measured: at GPT-B, batch 64 with CFG, on one H100, SDPA's memory-efficient kernel took
    71 µs per call over the whole 256-slot cache, 0.85 ms of a 1.32 ms GPU step; flex's decoding
    kernel, which reads only the 64-slot blocks up to t, takes 26 µs, and the step 0.78 ms: 1.57x
    the images/s of sdpa at batch 64, 1.44x at batch 32, one graph for all steps
    (bench/results/gpu_check_h100_20261127_s3.json, stage sample). ``math+bucket64`` reads the same
    amount through inductor's own reductions but needs four graphs; not yet measured (stage
    sample_ab).
    """
    return DecodeAttention("flex")


@dataclass
class DecodeMask:
    """One step's attention: the query reads cache slots [0, ``kv_len``), of which ``mask`` keeps 0..t.

    ``mask`` is a dense bool (1, 1, 1, kv_len) for sdpa and math, a BlockMask for flex.
    """

    kernel: DecodeKernel
    kv_len: int
    mask: Tensor | BlockMask


def flex_decode_mask(input_pos: Tensor, max_len: int, block: int) -> BlockMask:
    """The BlockMask of one query at position t = ``input_pos[0]`` over ``max_len`` cache slots.

    It lists the KV blocks 0..t // block; ``mask_mod`` cuts the last one at t. Built from tensors
    inside the step (the gpt-fast decode, without a full-length mask to slice): no host sync, one
    graph for every t.
    """
    t = input_pos[0]
    num_blocks = -(-max_len // block)
    kv_num_blocks = (t // block + 1).to(torch.int32).view(1, 1, 1)
    kv_indices = torch.arange(num_blocks, dtype=torch.int32, device=input_pos.device).view(1, 1, 1, num_blocks)

    def up_to_t(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= t

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=(128, block),  # one query, so one Q block (a multiple of the decoding kernel's 16 rows)
        mask_mod=up_to_t,
        seq_lengths=(1, max_len),
        compute_q_blocks=False,  # the q-side blocks serve only the backward
    )


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query per row: q (B, H, 1, D) over k, v (B, H, L, D) where ``mask`` (1, 1, 1, L) -> (B, H, 1, D).

    Written as products and sums rather than matmuls so that inductor fuses each into one reduction
    (a matmul would stay a cuBLAS call on a (1 x D) by (D x L) product); the scores, the softmax
    and the weighted sum run in float32.
    """
    scores = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # (B, H, L)
    probs = scores.masked_fill(~mask[:, :, 0], float("-inf")).softmax(-1)
    out = (probs[..., None] * v.float()).sum(-2)  # (B, H, D)
    return out[:, :, None].to(q.dtype)
