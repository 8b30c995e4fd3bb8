"""The MuToR loss: ``(1 - a)·L_ntp + a·L_reg`` over the two blocks ``[regular | registers]``.

:func:`combined_loss` takes the logits; :func:`combined_loss_from_hidden` takes the final hidden
states and the head weight, and runs the head then :func:`combined_loss`, or the head + CE in chunks
(``linear_ce.py``) so that the (B, N + R, V) float32 logits never exist whole. The register labels come from the layout
(``RegisterLayout.register_labels`` in ``registers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mutor_vision.core.linear_ce import weighted_linear_cross_entropy
from mutor_vision.core.registers import IGNORE_INDEX

LossNormalization = Literal["token", "sample"]


@dataclass(frozen=True)
class LossParts:
    """The combined loss and its parts (detached parts are for logging)."""

    loss: Tensor  # (1 - a)·L_ntp + a·L_reg, differentiable
    ntp: Tensor  # L_ntp, token mean
    reg: Tensor  # L_reg, token mean over valid registers (0 when there are none)
    num_ntp_tokens: Tensor  # () long
    num_reg_tokens: Tensor  # () long

    def named(self) -> dict[str, Tensor]:
        """What a training forward returns: ``loss`` (to backpropagate) and the parts logged by name."""
        return {"loss": self.loss, "loss_ntp": self.ntp, "loss_reg": self.reg}


def combined_loss(
    ntp_logits: Tensor,
    ntp_labels: Tensor,
    register_logits: Tensor | None = None,
    register_labels: Tensor | None = None,
    register_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    normalization: LossNormalization = "token",
) -> LossParts:
    """``(1 - a)·L_ntp + a·L_reg``; ``L_reg = 0`` (never NaN) without valid registers.

    ``normalization``: ``token`` — each part is the mean over every labelled position of the batch
    (long rows weigh more); ``sample`` — each part is the mean over the batch of per-row means, a row
    without a valid register counting 0 in ``L_reg`` (what batch 1 with gradient accumulation, the
    text authors' setting, optimises). Logits (B, N, V) / (B, R, V) are compared in float32; labels
    equal to ``ignore_index`` count nowhere. Without registers (next-token) the loss is plain L_ntp.
    """
    _check_loss_args(register_weight, normalization)
    if register_logits is not None and register_labels is None:
        raise ValueError("register_labels are required with register_logits")
    ntp_weights = _token_weights(ntp_labels, ignore_index, normalization)
    ntp = _weighted_ce(ntp_logits, ntp_labels, ntp_weights, ignore_index)
    ntp_count = (ntp_labels != ignore_index).sum()
    if register_logits is None:
        zero = ntp.new_zeros(())
        return LossParts(ntp, ntp.detach(), zero, ntp_count, torch.zeros_like(ntp_count))
    reg_weights = _token_weights(register_labels, ignore_index, normalization)
    reg = _weighted_ce(register_logits, register_labels, reg_weights, ignore_index)
    loss = (1.0 - register_weight) * ntp + register_weight * reg
    return LossParts(loss, ntp.detach(), reg.detach(), ntp_count, (register_labels != ignore_index).sum())


def combined_loss_from_hidden(
    hidden: Tensor,
    head_weight: Tensor,
    ntp_labels: Tensor,
    register_labels: Tensor | None = None,
    register_weight: float = 0.5,
    chunk_size: int = 0,
    ignore_index: int = IGNORE_INDEX,
    normalization: LossNormalization = "token",
) -> LossParts:
    """:func:`combined_loss` from the final hidden states of ``[regular | registers]`` (B, N + R, D)
    and the head weight (V, D) of a bias-free linear head.

    ``chunk_size`` 0: the head over each block, then :func:`combined_loss` on the float32 logits.
    Otherwise the head and CE run ``chunk_size`` positions at a time (``linear_ce.py``): the
    (B, N + R, V) logits are never materialised whole.
    """
    _check_loss_args(register_weight, normalization)
    batch, num_tokens = ntp_labels.shape
    num_registers = 0 if register_labels is None else register_labels.shape[1]
    if hidden.shape[:2] != (batch, num_tokens + num_registers):
        registers = "" if register_labels is None else f" + {tuple(register_labels.shape)}"
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match the labels {tuple(ntp_labels.shape)}{registers}")
    if not chunk_size:
        # Each block through the head on its own: slicing (B, T, D) is cheap, slicing (B, T, V) logits
        # is not (their backward zero-fills, and the CE would run on non-contiguous views).
        ntp_logits = F.linear(hidden[:, :num_tokens], head_weight).float()
        register_logits = None
        if register_labels is not None:
            register_logits = F.linear(hidden[:, num_tokens:], head_weight).float()
        return combined_loss(
            ntp_logits, ntp_labels, register_logits, register_labels, register_weight, ignore_index, normalization
        )
    ntp_weights = _token_weights(ntp_labels, ignore_index, normalization)
    labels, weights = ntp_labels, ntp_weights
    if register_labels is not None:
        reg_weights = _token_weights(register_labels, ignore_index, normalization)
        labels = torch.cat([ntp_labels, register_labels], dim=1)
        weights = torch.cat([(1.0 - register_weight) * ntp_weights, register_weight * reg_weights], dim=1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    loss, per_token = weighted_linear_cross_entropy(
        rows, head_weight, labels.reshape(-1), weights.reshape(-1), chunk_size, ignore_index
    )
    per_token = per_token.view(batch, -1)
    ntp = (per_token[:, :num_tokens] * ntp_weights).sum()
    ntp_count = (ntp_labels != ignore_index).sum()
    if register_labels is None:
        return LossParts(loss, ntp, ntp.new_zeros(()), ntp_count, torch.zeros_like(ntp_count))
    reg = (per_token[:, num_tokens:] * reg_weights).sum()
    return LossParts(loss, ntp, reg, ntp_count, (register_labels != ignore_index).sum())


def _check_loss_args(register_weight: float, normalization: str) -> None:
    if not 0.0 <= register_weight <= 1.0:
        raise ValueError(f"register_weight must be in [0, 1], got {register_weight}")
    if normalization not in ("token", "sample"):
        raise ValueError(f"normalization must be 'token' or 'sample', got {normalization!r}")


def _token_weights(labels: Tensor, ignore_index: int, normalization: str) -> Tensor:
    """Float32 weights w (B, T) with ``sum(w * CE)`` the part's mean: token or per-row mean, 0 over nothing."""
    counted = (labels != ignore_index).float()
    if normalization == "token":
        return counted / counted.sum().clamp(min=1)
    # A row with nothing to predict weighs 0 (its mean counts 0), so the mean is still over all rows.
    return counted / counted.sum(dim=1, keepdim=True).clamp(min=1) / labels.shape[0]


def _weighted_ce(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int) -> Tensor:
    flat = logits.reshape(-1, logits.shape[-1]).float()
    per_token = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return (per_token * weights.reshape(-1)).sum()
