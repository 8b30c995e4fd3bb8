"""Sampling variants kept for benchmarks and as test references, outside the library.

- :func:`generate_without_cache`: every token from a full forward over the prefix, no KV cache (the
  slow first-principles reference: ``tests/test_sampling.py`` compares the cached decode with it;
  ``bench/sample.py`` times it).
- :func:`generate_in_groups`: k decode steps per call of one function (``steps_per_graph``), so that
  compiled on CUDA one CUDA-graph replay and one copy of k codes serve k steps and the host's
  per-replay work is paid N/k times. Not in the library until an H100 measures it faster
  (``bench/sample.py --steps-per-graph``, gpu_check's sample stage).

Both give exactly the codes of ``generate`` (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mutor_vision import parallelize
from mutor_vision.models import GPT, SamplingConfig
from mutor_vision.models.sampling import decode_step, decoding, next_code, with_null_rows


def _numbers(model: GPT, labels: Tensor, sampling: SamplingConfig, uniform: Tensor | None) -> Tensor:
    """generate()'s uniform numbers, one row per step (N, B), on the labels' device."""
    batch, num_tokens = labels.shape[0], model.config.num_tokens
    if uniform is None:
        uniform = torch.rand(batch, num_tokens, generator=torch.Generator().manual_seed(sampling.seed))
    return uniform.t().contiguous().to(labels.device)


@torch.no_grad()
def generate_without_cache(
    model: GPT, labels: Tensor, sampling: SamplingConfig, uniform: Tensor | None = None
) -> Tensor:
    """``generate``'s codes (B, h, w), each token from a full forward over [class, x_1..x_i]."""
    by_step = _numbers(model, labels, sampling, uniform)
    rows = with_null_rows(labels, model) if sampling.guided else labels
    batch, num_tokens = labels.shape[0], model.config.num_tokens
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=labels.device)
    prefix = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=labels.device)
    was_training = model.training
    model.eval()
    for i in range(num_tokens):
        # Its last logits predict x_{i+1}; the placeholder after the prefix is never attended to.
        logits = model(prefix, rows).logits[:, -1]
        codes[:, i] = next_code(logits, by_step[i], sampling, torch.tensor([i], device=labels.device) if i else None)
        step_codes = torch.cat([codes[:, i], codes[:, i]]) if sampling.guided else codes[:, i]
        prefix = torch.cat([prefix[:, :i], step_codes[:, None], prefix[:, i:]], dim=1)
    model.train(was_training)
    return codes.view(batch, model.config.grid_size, model.config.grid_size)


def decode_steps(model: GPT, previous: Tensor, positions: Tensor, uniforms: Tensor, sampling: SamplingConfig) -> Tensor:
    """k consecutive decode steps in one call: the codes (B, k) that follow ``previous`` (B,) at
    positions ``positions`` (k,), step j drawing with ``uniforms[j]`` (B,). A Python loop over the
    static k: compiled, dynamo unrolls it into one graph (one CUDA-graph replay for k steps)."""
    codes = []
    for j in range(positions.shape[0]):
        previous = decode_step(model, previous, positions[j : j + 1], uniforms[j], sampling)
        codes.append(previous)
    return torch.stack(codes, dim=1)


def step_groups(num_tokens: int, steps_per_graph: int) -> list[tuple[int, int]]:
    """The decode steps 1..N-1 as (first position, count): runs of ``steps_per_graph``, then the
    remainder one step at a time (so two graphs, of k steps and of one, cover every N)."""
    k = steps_per_graph
    whole = (num_tokens - 1) // k * k
    return [(i, k) for i in range(1, 1 + whole, k)] + [(i, 1) for i in range(1 + whole, num_tokens)]


@torch.no_grad()
def generate_in_groups(
    model: GPT,
    labels: Tensor,
    sampling: SamplingConfig,
    steps_per_graph: int,
    compile: bool = False,
    uniform: Tensor | None = None,
) -> Tensor:
    """``generate`` with ``steps_per_graph`` decode steps per call (:func:`decode_steps`), the last
    (N − 1) mod k one at a time: the same codes (B, h, w)."""
    if steps_per_graph < 1:
        raise ValueError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
    by_step = _numbers(model, labels, sampling, uniform)
    rows = with_null_rows(labels, model) if sampling.guided else labels
    batch, num_tokens = labels.shape[0], model.config.num_tokens
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=labels.device)
    positions = torch.arange(num_tokens, device=labels.device)
    one_step = parallelize.cuda_graph(decode_step) if compile else decode_step
    k_steps = parallelize.cuda_graph(decode_steps) if compile else decode_steps
    with decoding(model, rows.shape[0], compile):
        codes[:, 0] = next_code(model.prefill(rows), by_step[0], sampling)
        for i, n in step_groups(num_tokens, steps_per_graph):
            # A graph's output lives in its memory until the next replay: the assignment copies it.
            if n == 1:
                codes[:, i] = one_step(model, codes[:, i - 1], positions[i : i + 1], by_step[i], sampling)
            else:
                run = positions[i : i + n], by_step[i : i + n]
                codes[:, i : i + n] = k_steps(model, codes[:, i - 1], *run, sampling)
    return codes.view(batch, model.config.grid_size, model.config.grid_size)
