"""The inverse-CDF draw: one token per row from a filtered distribution at a given uniform number.

A draw here is an exact draw from the distribution, like ``torch.multinomial``, but a pure function
of its uniform number, so sampling can fix every number before decoding starts (image sampling in
``models/sampling.py``) and register drafting can draw its corrections with the same rule
(``drafting.py``). :func:`filtered_probs` is the distribution a sampled token comes from
(temperature, top-k, top-p); :func:`cumulative` is the CDF as two short scans (it compiles on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution a draw comes from: softmax(logits / temperature) after top-k and top-p (B, V)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = cumulative(probs) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def cumulative(probs: Tensor, block: int = 128) -> Tensor:
    """``probs.cumsum(-1)`` for (B, V) as two short scans (within blocks of ``block``, then over blocks).

    Inductor compiles a single scan over V = 16,384 as a split scan whose codegen fails on CUDA
    (torch 2.11: ``InductorError ... list indices must be integers``), which broke every compiled
    non-greedy sampling run. Short scans compile as plain ones.
    """
    v = probs.shape[-1]
    if v <= block or v % block:
        return probs.cumsum(dim=-1)
    within = probs.reshape(*probs.shape[:-1], v // block, block).cumsum(dim=-1)
    ends = within[..., -1].cumsum(dim=-1)  # the mass up to the end of each block
    before = torch.cat([torch.zeros_like(ends[..., :1]), ends[..., :-1]], dim=-1)
    return (within + before.unsqueeze(-1)).reshape(probs.shape)


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """One token per row of ``probs`` (B, V) by the inverse CDF at ``uniform`` (B,) in [0, 1)."""
    cdf = cumulative(probs)
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    # The first token with mass whose cdf passes the target: searchsorted(right=True) where the cdf
    # rises, as a plain reduction (inductor's searchsorted lowering fails on the scan's output on
    # CUDA, torch 2.11). Requiring mass means a cdf that a scan's rounding makes dip by an ulp can
    # never pick a filtered-out (zero) token.
    passes = (cdf > target) & (probs > 0)
    index = passes.to(torch.uint8).argmax(dim=-1)  # argmax returns the first of equal maxima
    # Rounding can put the target at the total: fall back to the last token with mass, never past it.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return torch.where(passes.any(dim=-1), index, last)
