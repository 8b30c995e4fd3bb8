"""KV-cache sampling with classifier-free guidance (LlamaGen's protocol), and register drafting.

Registers are never inserted by :func:`generate`: this is plain LlamaGen sampling. CFG runs the
conditional rows first and the null-class rows second in one batch and guides on logits with a
constant scale: ``uncond + s·(cond − uncond)``; then temperature, top-k, top-p, and one draw.

Randomness is one uniform number per (image, token), fixed before decoding starts, and each draw
is the inverse CDF of the filtered distribution at that number: an exact draw from it, like
``torch.multinomial``, but a pure function of the numbers. So an image depends on its own numbers
only — never on which other images share its batch — and evaluation derives them from (seed,
image index): a rerun that refills half a batch reproduces the images of an uninterrupted run.
The filtering and the draw are ``mutor_vision/core/draw.py``.

One path, two speeds: :func:`generate` runs :func:`decode_step` for each token, eagerly, or with
``compile=True`` the same step compiled (captured as CUDA graphs on CUDA: ``mutor_vision/parallelize.py``),
where it attends with FlexAttention (``decode.py``). :func:`generate_drafted` lets the trained
registers draft ahead over the same KV cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mutor_vision import parallelize
from mutor_vision.config import check
from mutor_vision.core.device import generator_device
from mutor_vision.core.drafting import DecodeStats, Drafter, check_draft_tokens, round_registers
from mutor_vision.core.draw import draw, filtered_probs
from mutor_vision.core.registers import offsets_2d_support
from mutor_vision.errors import ConfigError
from mutor_vision.models.gpt import GPT
from mutor_vision.seeds import hash_seed


@dataclass(frozen=True)
class SamplingConfig:
    """How codes are drawn. The defaults are plain conditional sampling; the paper's FID protocol is
    ``cfg_scale=2.0`` with the rest at defaults."""

    cfg_scale: float = 1.0  # classifier-free guidance on logits; 1.0 = no null-class rows
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0  # the uniform numbers of every draw derive from it
    cfg_interval: int = (
        -1
    )  # LlamaGen's: guide the first cfg_interval + 2 tokens only, then the conditional rows; -1: all

    def __post_init__(self) -> None:
        check(self.cfg_scale >= 0, "cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        check(
            self.cfg_interval >= -1, "cfg_interval", f"must be >= -1 (-1: guide every token), got {self.cfg_interval}"
        )
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")

    @property
    def guided(self) -> bool:
        """Whether the null-class rows run (CFG on)."""
        return self.cfg_scale != 1.0

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from logits (B, V). temperature 0 is greedy; top_k 0 / top_p 1.0 are off.

    ``uniform`` (B,) fixes the draw; without it the numbers come from ``generator``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=generator_device(generator))
        uniform = uniform.to(logits.device)
    return draw(filtered_probs(logits, temperature, top_k, top_p), uniform)


def guide(logits: Tensor, cfg_scale: float) -> Tensor:
    """Combine a [conditional; null] batch (2B, V) into guided logits (B, V)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def sample_uniforms(seed: int, sample_ids: Sequence[int], num_tokens: int) -> Tensor:
    """The (B, N) uniform numbers of samples ``sample_ids``: each row from its own seed (seed, id), on CPU."""
    rows = [
        torch.rand(num_tokens, generator=torch.Generator().manual_seed(hash_seed(seed, int(i)))) for i in sample_ids
    ]
    return torch.stack(rows)


def next_code(logits: Tensor, uniform: Tensor, sampling: SamplingConfig, position: Tensor | None = None) -> Tensor:
    """The codes (B,) at sequence ``position`` (1,) drawn from the model's logits ((2B, V) with CFG's null
    rows, else (B, V)). None: the first token (position 0)."""
    if sampling.guided:
        guided = guide(logits, sampling.cfg_scale)
        if sampling.cfg_interval >= 0 and position is not None:
            # LlamaGen's cfg_interval: decode step i (the token at position i + 1) is guided while
            # i <= cfg_interval, then the conditional rows alone decide (the null rows still run).
            guided = torch.where(position > sampling.cfg_interval + 1, logits.chunk(2)[0], guided)
        logits = guided
    return sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, uniform=uniform)


def decode_step(model: GPT, previous: Tensor, position: Tensor, uniform: Tensor, sampling: SamplingConfig) -> Tensor:
    """One decode step: the codes (B,) that follow ``previous`` (B,) at sequence ``position`` (1,).

    Embedding, every layer over the KV cache, norm and head, CFG, filtering and the draw: the whole
    step, with static shapes and no host sync, so that it runs as one CUDA graph.
    """
    rows = torch.cat([previous, previous]) if sampling.guided else previous
    return next_code(model.decode(rows[:, None], position), uniform, sampling, position)


@torch.no_grad()
def generate(
    model: GPT,
    labels: Tensor,
    sampling: SamplingConfig | None = None,
    uniform: Tensor | None = None,
    compile: bool = False,
) -> Tensor:
    """Sample codes (B, h, w) for class ``labels`` (B,) with ``sampling`` (default: ``SamplingConfig()``).

    ``uniform`` (B, N) fixes every draw (see the module docstring); without it the numbers come from
    ``sampling.seed`` (one stream for the batch).

    ``compile`` runs each decode step compiled: on CUDA one captured CUDA graph per (batch,
    settings), the KV cache kept allocated for the next call at that batch size
    (``model.clear_caches()`` frees it); on the CPU inductor's code. The codes are those of the
    eager steps.
    """
    sampling = sampling or SamplingConfig()
    batch, num_tokens = labels.shape[0], model.config.num_tokens
    if uniform is None:
        uniform = torch.rand(batch, num_tokens, generator=torch.Generator().manual_seed(sampling.seed))
    if uniform.shape != (batch, num_tokens):
        raise ValueError(f"uniform must have shape {(batch, num_tokens)}, got {tuple(uniform.shape)}")
    uniform_by_step = uniform.t().contiguous().to(labels.device)  # (N, B): one contiguous row per step
    rows = with_null_rows(labels, model) if sampling.guided else labels
    positions = torch.arange(num_tokens, device=labels.device)  # no host-to-device copy per step
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=labels.device)
    step = parallelize.cuda_graph(decode_step) if compile else decode_step
    with decoding(model, rows.shape[0], compile):
        codes[:, 0] = next_code(model.prefill(rows), uniform_by_step[0], sampling)
        for i in range(1, num_tokens):
            # A graph's output lives in its memory until the next replay: the assignment copies it.
            codes[:, i] = step(model, codes[:, i - 1], positions[i : i + 1], uniform_by_step[i], sampling)
    return codes.view(batch, model.config.grid_size, model.config.grid_size)


def with_null_rows(labels: Tensor, model: GPT) -> Tensor:
    """CFG's batch (2B,): the labels, then as many null-class rows."""
    return torch.cat([labels, torch.full_like(labels, model.config.num_classes)])


@contextlib.contextmanager
def decoding(model: GPT, rows: int, compile: bool = False) -> Iterator[None]:
    """``model`` ready to decode ``rows`` sequences: in eval mode, with a KV cache; afterwards its mode
    restored and the cache freed. With ``compile`` the cache stays at fixed addresses for the compiled
    steps (``parallelize.graph_session``) and is kept, since a captured CUDA graph points at it."""
    was_training = model.training
    model.eval()
    try:
        model.setup_caches(rows)
        with parallelize.graph_session(model) if compile else contextlib.nullcontext():
            yield
    finally:
        if not compile:
            model.clear_caches()
        model.train(was_training)


# ---- register drafting


def trained_raster_offsets(model: GPT) -> tuple[list[int], str]:
    """The raster offsets the model's registers were trained on, and its register settings in words."""
    config, registers = model.config, model.config.registers
    if not registers.enabled:
        raise ConfigError("draft_tokens: the model was trained without registers (registers.mode: ntp)")
    if registers.mode == "mutor2d":
        offsets = offsets_2d_support(registers.d_max_2d, config.grid_size)
        return offsets, f"mode mutor2d, d_max_2d {registers.d_max_2d}, grid {config.grid_size}"
    return list(range(1, registers.d_max + 1)), f"mode mutor1d, d_max {registers.d_max}"


@torch.no_grad()
def generate_drafted(
    model: GPT, labels: Tensor, sampling: SamplingConfig, draft_tokens: int, stats: DecodeStats | None = None
) -> Tensor:
    """:func:`generate` with register drafting: codes (B, h, w) from the same distribution, in fewer forwards
    when drafts are accepted (``docs/drafting.md``).

    Each forward feeds the pending code and up to ``draft_tokens - 1`` drafts with their registers over
    the KV cache (CFG rows included); the round itself is ``core/drafting.py``'s :class:`Drafter`. Its
    random numbers come from ``sampling.seed``, drawn per round. ``stats`` adds the forwards and tokens.
    """
    k = draft_tokens
    if sampling.guided and sampling.cfg_interval >= 0:
        raise ConfigError("cfg_interval: not with register drafting (draft_tokens > 1); use -1")
    trained, settings = trained_raster_offsets(model)
    offsets = torch.tensor(check_draft_tokens(k, trained, settings), device=labels.device)  # d = 2..k
    device, batch, num_tokens = labels.device, labels.shape[0], model.config.num_tokens
    rows = with_null_rows(labels, model) if sampling.guided else labels
    combine = functools.partial(guide, cfg_scale=sampling.cfg_scale) if sampling.guided else None
    drafter = Drafter(k, sampling.temperature, sampling.top_k, sampling.top_p, combine)
    numbers = torch.Generator().manual_seed(sampling.seed)
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    forwards = 0
    with decoding(model, rows.shape[0]):
        # The class token, with registers anchored at it: x_1 and the drafts of x_2..x_k.
        anchors = torch.zeros_like(offsets)
        logits, register_logits = model.extend(
            model.cls_embedding(rows)[:, None], torch.zeros(1, dtype=torch.long, device=device), anchors, offsets - 1
        )
        forwards += 1
        u = torch.rand(batch, 2 * k - 1, generator=numbers).to(device)
        codes[:, 0], drafts = drafter.start(logits[:, 0], register_logits, u)
        t = 1  # x_1..x_t committed; x_t (sequence position t) not yet in the cache
        while t < num_tokens:
            n = min(k, num_tokens - t)  # the pending token and n - 1 drafts, never past position N - 1
            fed = torch.cat([codes[:, t - 1 : t], drafts.tokens[:, : n - 1]], dim=1)
            positions = torch.arange(t, t + n, device=device)
            fed_index, offset = round_registers(n, k, device)
            anchors = positions[fed_index]
            register_positions = (anchors + offset - 1).clamp(max=num_tokens - 1)  # past N: never used
            fed_rows = torch.cat([fed, fed]) if sampling.guided else fed
            logits, register_logits = model.extend(
                model.tok_embeddings(fed_rows), positions, anchors, register_positions
            )
            forwards += 1
            u = torch.rand(batch, 2 * k - 1, generator=numbers).to(device)
            step = drafter.verify(logits, register_logits, drafts, u)
            codes[:, t : t + step.m + 1] = step.tokens  # rejected drafts' cache slots are overwritten later
            drafts = step.drafts
            t += step.m + 1
    if stats is not None:  # accumulates over calls
        stats.add(DecodeStats(forwards=forwards, tokens=num_tokens))
    return codes.view(batch, model.config.grid_size, model.config.grid_size)
