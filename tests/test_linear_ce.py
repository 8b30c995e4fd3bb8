"""The chunked head + cross-entropy (linear_ce.py) and the combined loss built on it."""

import pytest
import torch
import torch.nn.functional as F

from mutor_vision.core.linear_ce import weighted_linear_cross_entropy
from mutor_vision.core.loss import combined_loss, combined_loss_from_hidden
from mutor_vision.core.registers import IGNORE_INDEX


def reference(hidden, weight, targets, token_weights):
    """The plain formula: whole logits, per-token CE, weighted sum."""
    per_token = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * token_weights).sum(), per_token


def problem(seed: int = 0, rows: int = 13, dim: int = 8, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[[2, 7]] = IGNORE_INDEX
    token_weights = torch.rand(rows, generator=g)
    return hidden, weight, targets, token_weights


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
def test_value_per_token_losses_and_gradients_equal_the_whole_logits(chunk_size):
    hidden, weight, targets, token_weights = problem()
    loss, per_token = weighted_linear_cross_entropy(hidden, weight, targets, token_weights, chunk_size)
    expected, expected_per_token = reference(hidden, weight, targets, token_weights)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_token, expected_per_token.detach())
    assert per_token[2] == 0 and not per_token.requires_grad
    for got, want in zip(grads(loss, hidden, weight), grads(expected, hidden, weight), strict=True):
        torch.testing.assert_close(got, want)


def test_upstream_gradient_scales_the_stored_gradients():
    hidden, weight, targets, token_weights = problem(1)
    loss, _ = weighted_linear_cross_entropy(hidden, weight, targets, token_weights, 5)
    expected, _ = reference(hidden, weight, targets, token_weights)
    for got, want in zip(grads(-3.0 * loss, hidden, weight), grads(-3.0 * expected, hidden, weight), strict=True):
        torch.testing.assert_close(got, want)


def test_ignored_rows_get_no_gradient_whatever_their_weight():
    hidden, weight, targets, token_weights = problem(2)
    loss, _ = weighted_linear_cross_entropy(hidden, weight, targets, token_weights, 3)
    grad_hidden, _ = grads(loss, hidden, weight)
    assert (grad_hidden[[2, 7]] == 0).all() and (grad_hidden[[0, 1]] != 0).all()


def test_autocast_runs_the_head_in_the_autocast_dtype():
    # As nn.Linear under autocast: bf16 matmuls, float32 CE; the weight's gradient comes back float32.
    hidden, weight, targets, token_weights = problem(3, rows=32, dim=16, vocab=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = weighted_linear_cross_entropy(hidden, weight, targets, token_weights, 8)
        expected = (
            F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
            * token_weights
        ).sum()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-2, rtol=1e-2)
    got, want = grads(loss, hidden, weight), grads(expected, hidden, weight)
    assert got[1].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(hidden=torch.randn(4, 3)), "hidden"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), "dtype|float64"),
    ],
)
def test_bad_arguments_are_named(change, match):
    hidden, weight, targets, token_weights = problem()
    args = dict(hidden=hidden, weight=weight, targets=targets, token_weights=token_weights, chunk_size=4) | change
    with pytest.raises(ValueError, match=match):
        weighted_linear_cross_entropy(**args)


@pytest.mark.parametrize("normalization", ["token", "sample"])
@pytest.mark.parametrize("with_registers", [True, False])
def test_combined_loss_from_hidden_equals_combined_loss_of_the_logits(normalization, with_registers):
    # Row 1 has no valid register (it counts 0 in L_reg); rows have different answer lengths.
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    head = torch.randn(9, 6, generator=g, requires_grad=True)
    ntp_labels = torch.tensor([[0, 1, 2], [3, IGNORE_INDEX, 4]])
    reg_labels = torch.tensor([[5, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]) if with_registers else None
    if not with_registers:
        hidden = hidden[:, :3]
    logits = hidden @ head.T
    expected = combined_loss(
        logits[:, :3],
        ntp_labels,
        logits[:, 3:] if with_registers else None,
        reg_labels,
        0.3,
        normalization=normalization,
    )
    parts = combined_loss_from_hidden(hidden, head, ntp_labels, reg_labels, 0.3, 2, normalization=normalization)
    for name in ("loss", "ntp", "reg", "num_ntp_tokens", "num_reg_tokens"):
        torch.testing.assert_close(getattr(parts, name), getattr(expected, name))
    assert not parts.ntp.requires_grad and not parts.reg.requires_grad
    inputs = (hidden, head)
    for got, want in zip(grads(parts.loss, *inputs), grads(expected.loss, *inputs), strict=True):
        torch.testing.assert_close(got, want)


def test_combined_loss_from_hidden_checks_shapes():
    with pytest.raises(ValueError, match="does not match the labels"):
        combined_loss_from_hidden(torch.randn(2, 4, 6), torch.randn(9, 6), torch.zeros(2, 3, dtype=torch.long))
