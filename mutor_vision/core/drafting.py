"""Register drafting: the trained registers propose the next tokens, the model itself verifies them.

A register anchored after token ``x_t`` with offset ``d`` was trained to predict ``x_{t+d}`` from
the prefix alone: a drafter with no extra head, model or parameter. Each decoding round feeds the
pending token and ``k − 1`` drafted ones, with registers anchored at every fed position (their
logits are the next round's drafts), and keeps the longest prefix that the standard speculative
sampling rule accepts: a draft ``y`` drawn from ``q`` is accepted with probability
``min(1, p(y) / q(y))``; on the first rejection the token is drawn from ``max(0, p − q)``
renormalised; when every draft is accepted a bonus token is drawn from ``p``. Every committed
token is then an exact draw from the model's own (filtered) distribution ``p``; greedy decoding
accepts a draft only when it is the argmax of ``p``, so its output equals plain greedy decoding.

Rows of a batch advance together: a round commits ``m + 1`` tokens, ``m`` the fewest drafts any row
accepted; a row that accepted more keeps its accepted draft as the token after those ``m`` (an
accepted draft is itself an exact draw from ``p``), so batching changes speed, never the result.
This module holds that rule for every modality; the image and text loops call it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mutor_vision.core.draw import draw
from mutor_vision.errors import ConfigError


def check_draft_tokens(k: int, trained: Iterable[int], settings: str) -> list[int]:
    """The offsets ``2..k`` a ``k``-token draft needs; an error naming ``settings`` if any was never trained."""
    if k < 2:
        raise ConfigError(f"draft_tokens must be >= 2 (the next token and at least one draft), got {k}")
    trained = set(trained)
    needed = list(range(2, k + 1))
    missing = [d for d in needed if d not in trained]
    if missing:
        most = 1
        while most + 1 in trained:
            most += 1
        raise ConfigError(
            f"draft_tokens {k}: the registers were never trained on offsets {missing} ({settings}); "
            + (f"at most draft_tokens {most}" if most >= 2 else "they cannot draft consecutive tokens")
        )
    return needed


def accepted_drafts(p: Tensor, q: Tensor, drafts: Tensor, uniform: Tensor, greedy: bool) -> Tensor:
    """How many leading drafts each row accepts: p, q (B, n, V) target and draft probabilities (logits
    when ``greedy``) of the n drafts (B, n), uniform (B, n) in [0, 1) -> (B,) long in [0, n]."""
    if drafts.shape[1] == 0:
        return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)
    if greedy:
        ok = drafts == p.argmax(dim=-1)
    else:
        p_y = p.gather(-1, drafts[..., None]).squeeze(-1)
        q_y = q.gather(-1, drafts[..., None]).squeeze(-1)
        ok = uniform * q_y < p_y  # u < p/q without dividing: q_y > 0 for a drawn draft
    return ok.long().cumprod(dim=1).sum(dim=1)


def correction(p: Tensor, q: Tensor | None, uniform: Tensor, greedy: bool) -> Tensor:
    """The token drawn at the first rejected draft: from ``max(0, p − q)`` renormalised (B, V) -> (B,);
    with ``q`` None (every draft accepted: the bonus token) from ``p`` itself. Greedy: the argmax of p."""
    if greedy:
        return p.argmax(dim=-1)
    residual = p if q is None else (p - q).clamp(min=0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q exactly: the residual is p itself
    return draw(torch.where(empty, p, residual), uniform)
