"""How the one-token decode attends over the static KV cache (``GPT.decode``, ``sampling.py``).

At sequence position t the query attends to cache slots 0..t; the slots past t hold zeros or stale
tokens of an earlier sequence and must never be seen. Both masks below say exactly that:

- eager: SDPA with a dense bool mask over the whole cache (on CUDA the memory-efficient kernel: the
  mask rules out flash, and cuDNN is avoided, ``gpt.py``);
- compiled (the CUDA-graph decode): FlexAttention with a BlockMask, built from t inside the step,
  that lists only the KV blocks up to t, so inductor's flex-decoding kernel never reads the blocks
  past t; one graph serves every step. Eager, flex would run its unfused reference, hence SDPA there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

FLEX_BLOCK = 64  # KV slots per flex block: the kernel skips the blocks past t


def decode_mask(input_pos: Tensor, max_len: int) -> Tensor | BlockMask:
    """The mask of the one query at position ``input_pos`` (1,) over ``max_len`` cache slots, traceable
    (no host sync): a BlockMask when compiled, else a dense bool (1, 1, 1, max_len)."""
    if torch.compiler.is_compiling():
        return flex_decode_mask(input_pos, max_len)
    slots = torch.arange(max_len, device=input_pos.device)
    return (slots[None, :] <= input_pos[:, None])[None, None]


def flex_decode_mask(input_pos: Tensor, max_len: int) -> BlockMask:
    """The BlockMask of one query at position t = ``input_pos[0]`` over ``max_len`` cache slots.

    It lists the KV blocks 0..t // ``FLEX_BLOCK``; ``mask_mod`` cuts the last one at t. Built from tensors
    inside the step (the gpt-fast decode, without a full-length mask to slice): no host sync, one
    graph for every t.
    """
    t, block = input_pos[0], FLEX_BLOCK
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
