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

This module holds that rule for every modality: :class:`Drafter` runs the round (the first token and
drafts after the prefill, then verify → accept → next drafts), :func:`round_registers` says which
registers a round feeds, and :class:`DecodeStats` counts forwards and tokens. The image loop
(``models/sampling.py``) and the text loop (``text/generate.py``) keep only their model call and
bookkeeping (KV cache, CFG, EOS, prompts, padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from mutor_vision.core.draw import draw, filtered_probs
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


# --------------------------------------------------------------------------------------------
# The engine: one draft → verify → accept round, for every modality
# --------------------------------------------------------------------------------------------


def round_registers(n: int, k: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The registers of a round that feeds ``n`` tokens: ``k − 1`` after each fed token, with offsets ``2..k``.

    Returns (fed index each register follows, its offset), both (n·(k − 1),), in the order the model must
    return their logits: all registers of fed token 0 first, each token's in offset order.
    """
    anchor = torch.arange(n, device=device).repeat_interleave(k - 1)
    return anchor, torch.arange(2, k + 1, device=device).repeat(n)


@dataclass(frozen=True)
class Drafts:
    """The drafts a round feeds after its pending token: tokens (B, k − 1) and the distributions ``q``
    (B, k − 1, V) they were drawn from (logits when greedy)."""

    tokens: Tensor
    dist: Tensor


@dataclass(frozen=True)
class Round:
    """What one verification committed: ``tokens`` (B, m + 1) are the ``m`` drafts every row accepted,
    then each row's next token; ``accepted`` (B,) how many drafts each row accepted (>= m, except for the
    rows :meth:`Drafter.verify` was told were finished); ``drafts`` feed the next round."""

    accepted: Tensor
    tokens: Tensor
    drafts: Drafts

    @property
    def m(self) -> int:
        """The drafts every row accepted: the round committed ``m + 1`` tokens per row."""
        return self.tokens.shape[1] - 1


@dataclass(frozen=True)
class Drafter:
    """The draft → verify → accept round of register drafting, written once for images and text.

    A modality supplies its model call and its bookkeeping; this holds the rule. After the prefill
    (the prompt or class token, with registers anchored at its last token with offsets ``2..k``)
    :meth:`start` gives the first token and the first drafts. Each round then feeds the pending token
    and the drafts (``drafts.tokens[:, :n - 1]``), with registers after every fed token
    (:func:`round_registers`), and :meth:`verify` turns the logits into the committed tokens and the
    next drafts. ``combine`` maps the model's rows to the batch's (images: classifier-free guidance,
    [conditional; null] -> guided); the settings filter ``p`` and ``q`` alike; temperature 0 is greedy.

    Random numbers: ``uniform`` (B, 2k − 1) per call, in [0, 1): in :meth:`start` column 0 draws the
    first token and 1..k − 1 the drafts; in :meth:`verify` columns 0..n − 2 test the n − 1 drafts,
    column k − 1 draws the correction (or bonus) token and k..2k − 2 the next drafts. Greedy needs none.
    """

    k: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    combine: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (the next token, then k - 1 drafts), got {self.k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logits: Tensor) -> Tensor:
        """Model logits (rows, ..., V) -> the batch's target (B, ..., V): probabilities, logits when greedy."""
        logits = logits if self.combine is None else self.combine(logits)
        if self.greedy:
            return logits
        shape = logits.shape
        probs = filtered_probs(logits.reshape(-1, shape[-1]), self.temperature, self.top_k, self.top_p)
        return probs.view(shape)

    def pick(self, dist: Tensor, uniform: Tensor) -> Tensor:
        """One token per row of ``dist`` (B, n, V) at ``uniform`` (B, n) -> (B, n); greedy: the argmax."""
        if self.greedy:
            return dist.argmax(dim=-1)
        return draw(dist.reshape(-1, dist.shape[-1]), uniform.reshape(-1)).view(uniform.shape)

    def start(self, logits: Tensor, register_logits: Tensor, uniform: Tensor | None = None) -> tuple[Tensor, Drafts]:
        """After the prefill: the first token (B,) from the last prefix token's logits (rows, V), and the
        first drafts from the registers anchored there, offsets 2..k: logits (rows, k − 1, V)."""
        p = self.distribution(logits[:, None])  # (B, 1, V)
        uniform = self._numbers(uniform, p)
        return self.pick(p, uniform[:, :1])[:, 0], self._drafts(register_logits, uniform[:, 1 : self.k])

    def verify(
        self,
        logits: Tensor,
        register_logits: Tensor,
        drafts: Drafts,
        uniform: Tensor | None = None,
        finished: Tensor | None = None,
    ) -> Round:
        """One round's verdict from its forward: ``logits`` (rows, n, V) of the n fed tokens (the pending
        token, then ``drafts.tokens[:, :n - 1]``; logits[:, i] predicts the token after fed token i) and
        ``register_logits`` (rows, n·(k − 1), V) of the registers after them (:func:`round_registers`).

        Rows advance together by the fewest drafts any row accepted; ``finished`` (B,) bool marks rows
        that no longer matter (text past EOS): they never hold the others back.
        """
        k = self.k
        p = self.distribution(logits)  # (B, n, V): p[:, i] is the distribution after fed token i
        n = p.shape[1]
        uniform = self._numbers(uniform, p)
        fed, q = drafts.tokens[:, : n - 1], drafts.dist[:, : n - 1]
        accepted = accepted_drafts(p[:, : n - 1], q, fed, uniform[:, : n - 1], self.greedy)
        counted = accepted if finished is None else torch.where(finished, n - 1, accepted)
        m = int(counted.min())
        if m < n - 1:  # rows that rejected draft m draw the correction; the others keep their accepted draft
            fix = correction(p[:, m], drafts.dist[:, m], uniform[:, k - 1], self.greedy)
            last = torch.where(accepted <= m, fix, drafts.tokens[:, m])
        else:  # every draft accepted: the bonus token from p
            last = correction(p[:, m], None, uniform[:, k - 1], self.greedy)
        tokens = torch.cat([drafts.tokens[:, :m], last[:, None]], dim=1)
        # The registers anchored at the last accepted fed token (index m) draft the next round.
        nxt = self._drafts(register_logits[:, m * (k - 1) : (m + 1) * (k - 1)], uniform[:, k:])
        return Round(accepted=accepted, tokens=tokens, drafts=nxt)

    def _drafts(self, register_logits: Tensor, uniform: Tensor) -> Drafts:
        """Drafts from the k − 1 registers of one anchor: logits (rows, k − 1, V), uniform (B, k − 1)."""
        dist = self.distribution(register_logits)
        return Drafts(tokens=self.pick(dist, uniform), dist=dist)

    def _numbers(self, uniform: Tensor | None, like: Tensor) -> Tensor:
        if uniform is not None:
            return uniform
        if not self.greedy:
            raise ValueError("sampled drafting needs its uniform numbers (B, 2k - 1)")
        return torch.zeros(like.shape[0], 2 * self.k - 1, device=like.device)  # greedy reads none of them


@dataclass
class DecodeStats:
    """What a decode cost: model forwards and the tokens they advanced each row; accumulates over calls."""

    forwards: int = 0
    tokens: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    def add(self, other: DecodeStats) -> DecodeStats:
        """Add ``other`` to these counts, in place (returns self)."""
        self.forwards += other.forwards
        self.tokens += other.tokens
        return self

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats(self.forwards + other.forwards, self.tokens + other.tokens)
