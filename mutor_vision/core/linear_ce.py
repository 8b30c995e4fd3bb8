"""Head + cross-entropy in chunks of rows, so the (rows, V) float32 logits never exist whole.

``weighted_linear_cross_entropy(hidden, weight, targets, token_weights)`` is
``sum_i token_weights[i] * CE(hidden[i] @ weight.T, targets[i])`` with its gradients. Each chunk's
logits are built, reduced to its loss and its gradients with respect to ``hidden`` and ``weight``
(the loss is a weighted sum, so they are known in the forward pass), and freed; the backward only
scales the stored gradients. No matmul is recomputed, unlike checkpointing the head per chunk.

Why not a fused kernel library: they are CUDA/Triton only and a plain PyTorch loop keeps CPU runs
and tests on the same code; what chunking saves and costs is measured by ``bench/head_loss.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor, chunk_size: int, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """hidden (M, D), head weight (V, D), targets (M,), token_weights (M,) -> (loss, per-token CE (M,)).

    The loss is differentiable in ``hidden`` and ``weight``; the per-token CE is detached float32,
    0 where ``targets == ignore_index`` (those rows count nowhere, whatever their weight). The head
    runs in the autocast dtype when autocast is on (as ``nn.Linear`` would), the CE in float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden (M, D) and weight (V, D) expected, got {shapes}")
    if targets.shape != hidden.shape[:1] or token_weights.shape != hidden.shape[:1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} and token_weights {tuple(token_weights.shape)} "
            f"must be ({hidden.shape[0]},)"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # the casts' backward restores the dtypes
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} and weight {weight.dtype}; without autocast they must match")
    return _WeightedLinearCrossEntropy.apply(hidden, weight, targets, token_weights.float(), chunk_size, ignore_index)


class _WeightedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor, chunk_size: int, ignore_index: int
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_hidden, losses = [], []
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size]
                target = targets[start : start + chunk_size]
                valid = target != ignore_index
                safe_target = torch.where(valid, target, 0)[:, None]
                logits = (h @ weight.T).float()
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
                losses.append(torch.where(valid, (log_norm - logits.gather(1, safe_target)).squeeze(1), 0.0))
                # d CE / d logits = softmax - onehot, scaled by each row's weight (0 for ignored rows);
                # built in the logits' own memory, so a chunk holds one float32 (rows, V) buffer.
                grad_logits = logits.sub_(log_norm).exp_()
                grad_logits.scatter_add_(1, safe_target, torch.full_like(log_norm, -1.0))
                grad_logits *= torch.where(valid, token_weights[start : start + chunk_size], 0.0)[:, None]
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden.append(grad_logits @ weight)
                grad_weight += (grad_logits.T @ h).float()
            per_token = torch.cat(losses)
            loss = (per_token * token_weights).sum()
        ctx.save_for_backward(torch.cat(grad_hidden), grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(per_token)
        return loss, per_token

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_per_token: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None
