"""KV-cache sampling with classifier-free guidance (LlamaGen's protocol).

Registers are never inserted at inference: this is plain LlamaGen sampling. CFG runs the
conditional rows first and the null-class rows second in one batch and guides on logits with a
constant scale: ``uncond + s·(cond − uncond)``; then temperature, top-k, top-p, and one draw.

Randomness is one uniform number per (image, token), fixed before decoding starts, and each draw
is the inverse CDF of the filtered distribution at that number: an exact draw from it, like
``torch.multinomial``, but a pure function of the numbers. So an image depends on its own numbers
only — never on which other images share its batch — and evaluation derives them from (seed,
image index): a rerun that refills half a batch reproduces the images of an uninterrupted run.
The filtering and the draw are ``mutor_vision/core/draw.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mutor_vision.config import check
from mutor_vision.core.drafting import DecodeStats, Drafter, check_draft_tokens, round_registers
from mutor_vision.core.draw import draw, filtered_probs
from mutor_vision.core.registers import offsets_2d_support
from mutor_vision.errors import ConfigError
from mutor_vision.models.decode import EAGER_DEFAULT, DecodeAttention, graph_default
from mutor_vision.models.gpt import GPT
from mutor_vision.seeds import hash_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How codes are drawn. The defaults are plain conditional sampling; the paper's FID protocol is
    ``cfg_scale=2.0`` with the rest at defaults."""

    cfg_scale: float = 1.0  # classifier-free guidance on logits; 1.0 = no null-class rows
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0  # the uniform numbers of every draw derive from it

    def __post_init__(self) -> None:
        check(self.cfg_scale >= 0, "cfg_scale", f"must be >= 0, got {self.cfg_scale}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")

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
        uniform = torch.rand(logits.shape[0], generator=generator, device=_device(generator)).to(logits.device)
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


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def next_codes(
    model: GPT,
    previous: Tensor,
    position: Tensor,
    uniform: Tensor,
    sampling: SamplingConfig,
    guided: bool,
    attention: DecodeAttention = EAGER_DEFAULT,
    kv_len: int | None = None,
) -> Tensor:
    """One decode step: the codes (B,) that follow ``previous`` (B,) at sequence ``position`` (1,).

    Embedding, every layer over the KV cache, norm and head, CFG, filtering and the draw: the whole
    step, with static shapes and no host sync, so it can run as one CUDA graph. ``attention`` and
    ``kv_len`` are :meth:`GPT.decode`'s (constants of the graph: one graph per distinct value).
    """
    rows = torch.cat([previous, previous]) if guided else previous
    logits = model.decode(rows[:, None], position, attention, kv_len)
    logits = guide(logits, sampling.cfg_scale) if guided else logits
    return sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, uniform=uniform)


def decode_steps(
    model: GPT,
    previous: Tensor,
    positions: Tensor,
    uniforms: Tensor,
    sampling: SamplingConfig,
    guided: bool,
    attention: DecodeAttention,
    kv_lens: tuple[int, ...],
) -> Tensor:
    """k consecutive decode steps in one call: the codes (B, k) that follow ``previous`` (B,) at
    sequence positions ``positions`` (k,), step j drawing with ``uniforms[j]`` (B,) and reading
    ``kv_lens[j]`` cache slots.

    Each step is :func:`next_codes` and feeds its codes to the next. A Python loop over the static
    k: compiled, dynamo unrolls it into one graph (one CUDA-graph replay for k steps); the KV-cache
    writes, the BlockMask and the draw of each step are those of the single step at its position.
    """
    codes = []
    for j, kv_len in enumerate(kv_lens):
        previous = next_codes(model, previous, positions[j : j + 1], uniforms[j], sampling, guided, attention, kv_len)
        codes.append(previous)
    return torch.stack(codes, dim=1)


def step_groups(num_tokens: int, steps_per_graph: int) -> list[tuple[int, int]]:
    """The decode steps 1..N-1 as (first position, count): runs of ``steps_per_graph``, then the
    remainder one step at a time (so two graphs, of k steps and of one, cover every N)."""
    k = steps_per_graph
    whole = (num_tokens - 1) // k * k
    return [(i, k) for i in range(1, 1 + whole, k)] + [(i, 1) for i in range(1 + whole, num_tokens)]


def decode_loop(
    model: GPT,
    codes: Tensor,
    uniform_by_step: Tensor,
    sampling: SamplingConfig,
    guided: bool,
    attention: DecodeAttention,
    steps_per_graph: int = 1,
    one_step: Callable[..., Tensor] = next_codes,
    k_steps: Callable[..., Tensor] = decode_steps,
) -> None:
    """Fill ``codes[:, 1:]`` (B, N) from ``codes[:, 0]`` over the prefilled KV cache: ``k_steps``
    (:func:`decode_steps` or its graph) for each run of ``steps_per_graph`` steps, ``one_step``
    (:func:`next_codes` or its graph) for single steps. No host sync: positions and random numbers
    stay on the device, and the group sizes and KV lengths are Python ints."""
    num_tokens = codes.shape[1]
    positions = torch.arange(num_tokens, device=codes.device)  # no host-to-device copy per step
    for i, n in step_groups(num_tokens, steps_per_graph):
        # A graph's output lives in its memory until the next replay: copy it now.
        if n == 1:
            codes[:, i] = one_step(
                model, codes[:, i - 1], positions[i : i + 1], uniform_by_step[i], sampling, guided,
                attention, attention.kv_len(i, num_tokens),
            )  # fmt: skip
        else:
            kv_lens = tuple(attention.kv_len(p, num_tokens) for p in range(i, i + n))
            codes[:, i : i + n] = k_steps(
                model, codes[:, i - 1], positions[i : i + n], uniform_by_step[i : i + n], sampling, guided,
                attention, kv_lens,
            )  # fmt: skip


@functools.cache
def _graph_step() -> Callable[..., Tensor]:
    # One compiled function for the process: torch.compile caches a CUDA graph per (batch, settings).
    # "reduce-overhead" = CUDA graphs: 256 steps of small kernels are bound by launches, not FLOPs.
    return torch.compile(next_codes, mode="reduce-overhead", fullgraph=True, dynamic=False)


@functools.cache
def _graph_steps() -> Callable[..., Tensor]:
    # decode_steps as CUDA graphs: one per (batch, settings, k, KV lengths), k steps per replay.
    return torch.compile(decode_steps, mode="reduce-overhead", fullgraph=True, dynamic=False)


# Every (model, batch, settings, decode attention, KV length(s), k) is a graph of its own, and
# dynamo's default limit of 8 per function, under fullgraph, makes the 9th a hard error: a benchmark
# comparing decode attentions at two batch sizes, or bucketed attention, passes 8 in one process.
_GRAPH_LIMIT = 64


def _graph_limit() -> contextlib.AbstractContextManager:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    return config.patch(**{name: max(getattr(config, name), _GRAPH_LIMIT)})


def decode_attention_for(choice: str | DecodeAttention, graph: bool) -> DecodeAttention:
    """The decode attention ``generate`` runs: ``"auto"`` is :func:`~mutor_vision.models.decode.graph_default`
    for the CUDA-graph decode and sdpa eager; a name is parsed (``DecodeAttention.parse``)."""
    if isinstance(choice, DecodeAttention):
        return choice
    if choice == "auto":
        return graph_default() if graph else EAGER_DEFAULT
    return DecodeAttention.parse(choice)


@functools.cache
def _say_cpu_fallback() -> None:
    log.info("generate(compile=True): the CUDA-graph decode needs CUDA; sampling on the CPU runs eager")


@torch.no_grad()
def generate(
    model: GPT,
    labels: Tensor,
    sampling: SamplingConfig | None = None,
    *,
    uniform: Tensor | None = None,
    always_guide: bool = False,
    compile: bool = False,
    use_cache: bool = True,
    draft_tokens: int = 1,
    stats: DecodeStats | None = None,
    decode_attention: str | DecodeAttention = "auto",
    steps_per_graph: int = 1,  # stays 1 until an H100 measures k > 1 (docs/api.md)
    **settings,
) -> Tensor:
    """Sample codes (B, h, w) for class ``labels`` (B,).

    ``sampling`` holds the settings; keyword ``settings`` (``cfg_scale=2.0``, ...) build one instead.
    ``uniform`` (B, N) fixes every draw (see the module docstring); without it the numbers come
    from ``sampling.seed`` (one stream for the batch). The null-class rows run when ``cfg_scale !=
    1`` (or ``always_guide``, which measures/tests the guided path at scale 1). ``use_cache=False``
    recomputes the full prefix every step (the slow reference path).

    ``compile`` on CUDA runs each decode step (:func:`next_codes`) as a captured CUDA graph, one per
    (batch, settings), and keeps the KV cache allocated for the next call at that batch size
    (``model.clear_caches()`` frees it); on the CPU it is ignored (one log line).

    ``decode_attention`` is how each cached step attends over the cache (``mutor_vision/models/decode.py``;
    every choice computes the same): ``"auto"`` is ``flex`` for the CUDA-graph decode and ``sdpa``
    otherwise; ``"sdpa"``, ``"math"``, ``"flex"``, ``"math+bucket64"``, ... or a ``DecodeAttention``.

    ``steps_per_graph=k`` runs k consecutive decode steps per call of one function
    (:func:`decode_steps`): with ``compile`` on CUDA one CUDA-graph replay and one copy of k codes
    per k steps, so the host's per-replay work is paid N/k times; the last (N − 1) mod k steps run
    one at a time (a second, single-step graph). The codes are those of k = 1. It applies to the
    cached decode only (not ``use_cache=False`` nor drafting). The default stays 1 until an H100
    measures k > 1 (``bench/sample.py --steps-per-graph``; gpu_check's sample stage).

    ``draft_tokens=k`` (k >= 2) lets the trained registers draft ``k − 1`` tokens ahead and the model
    verify them (``mutor_vision/core/drafting.py``): the same distribution, fewer forwards when drafts are
    accepted. Its random numbers come from ``sampling.seed`` (``uniform`` does not apply); ``stats``
    (a :class:`~mutor_vision.core.drafting.DecodeStats`) adds the forwards and tokens of the run.
    """
    if sampling is None:
        sampling = SamplingConfig(**settings)
    elif settings:
        raise TypeError(f"pass either sampling or keyword settings, not both ({sorted(settings)})")
    if steps_per_graph < 1:
        raise ValueError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
    if draft_tokens > 1:
        return generate_drafted(model, labels, sampling, draft_tokens, always_guide, stats)
    was_training = model.training
    model.eval()
    config = model.config
    batch, num_tokens = labels.shape[0], config.num_tokens
    if uniform is None:
        uniform = torch.rand(batch, num_tokens, generator=torch.Generator().manual_seed(sampling.seed))
    if uniform.shape != (batch, num_tokens):
        raise ValueError(f"uniform must have shape {(batch, num_tokens)}, got {tuple(uniform.shape)}")
    uniform_by_step = uniform.t().contiguous().to(labels.device)  # (N, B): one contiguous row per step
    guided = always_guide or sampling.cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=labels.device)
    graph = compile and labels.is_cuda and use_cache
    attention = decode_attention_for(decode_attention, graph)
    if compile and not labels.is_cuda:
        _say_cpu_fallback()
    try:
        if use_cache:
            model.setup_caches(rows.shape[0])
            logits = model.prefill(rows)
            logits = guide(logits, sampling.cfg_scale) if guided else logits
            t = sampling
            codes[:, 0] = sample_logits(logits, t.temperature, t.top_k, t.top_p, uniform=uniform_by_step[0])
            steps = dict(one_step=_graph_step(), k_steps=_graph_steps()) if graph else {}
            with _graph_limit() if graph else contextlib.nullcontext():
                decode_loop(model, codes, uniform_by_step, sampling, guided, attention, steps_per_graph, **steps)
        else:
            prefix = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=labels.device)
            for i in range(num_tokens):
                # Full forward over [class, x_1..x_i]: its last logits predict x_{i+1}.
                logits = model(prefix, rows).logits[:, -1]
                logits = guide(logits, sampling.cfg_scale) if guided else logits
                t = sampling
                codes[:, i] = sample_logits(logits, t.temperature, t.top_k, t.top_p, uniform=uniform_by_step[i])
                step_codes = torch.cat([codes[:, i], codes[:, i]]) if guided else codes[:, i]
                prefix = torch.cat([prefix[:, :i], step_codes[:, None], prefix[:, i:]], dim=1)
    finally:
        if not graph:
            model.clear_caches()
        model.train(was_training)
    return codes.view(batch, config.grid_size, config.grid_size)


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
    model: GPT,
    labels: Tensor,
    sampling: SamplingConfig,
    k: int,
    always_guide: bool = False,
    stats: DecodeStats | None = None,
) -> Tensor:
    """:func:`generate` with register drafting: codes (B, h, w). The round is ``core/drafting.py``'s
    :class:`Drafter`; this feeds it (the class token, then the pending code and its drafts with their
    registers, over the KV cache, CFG rows included) and places what it commits."""
    trained, settings = trained_raster_offsets(model)
    offsets = torch.tensor(check_draft_tokens(k, trained, settings), device=labels.device)  # d = 2..k
    was_training = model.training
    model.eval()
    config, device = model.config, labels.device
    batch, num_tokens, guided = labels.shape[0], config.num_tokens, always_guide or sampling.cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
    combine = functools.partial(guide, cfg_scale=sampling.cfg_scale) if guided else None
    drafter = Drafter(k, sampling.temperature, sampling.top_k, sampling.top_p, combine)
    numbers = torch.Generator().manual_seed(sampling.seed)
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    forwards = 0
    try:
        model.setup_caches(rows.shape[0])
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
            fed_rows = torch.cat([fed, fed]) if guided else fed
            logits, register_logits = model.extend(
                model.tok_embeddings(fed_rows), positions, anchors, register_positions
            )
            forwards += 1
            u = torch.rand(batch, 2 * k - 1, generator=numbers).to(device)
            step = drafter.verify(logits, register_logits, drafts, u)
            codes[:, t : t + step.m + 1] = step.tokens  # rejected drafts' cache slots are overwritten later
            drafts = step.drafts
            t += step.m + 1
    finally:
        model.clear_caches()
        model.train(was_training)
    if stats is not None:  # accumulates over calls
        stats.add(DecodeStats(forwards=forwards, tokens=num_tokens))
    return codes.view(batch, config.grid_size, config.grid_size)
