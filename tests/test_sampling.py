"""The cached decode (``mutor_vision/models/sampling.py``, ``decode.py``): its logits are the full
forward's at every step over stale caches; its codes are those of the no-cache reference, eager and
compiled (the compiled step attends with flex, on the CPU through inductor, one graph for all
steps); and the benchmark-only variant with k decode steps per call (``bench/decode_variants.py``)
gives the codes of one step per call."""

import sys

import pytest
import torch
from conftest import ROOT
from torch._dynamo.utils import counters

from mutor_vision.errors import ConfigError
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate, sample_logits, sample_uniforms
from mutor_vision.models.decode import FLEX_BLOCK, decode_mask
from mutor_vision.models.sampling import guide

sys.path.insert(0, str(ROOT / "bench"))  # bench/ is a folder of scripts, not a package
from decode_variants import generate_in_groups, generate_without_cache, step_groups

GREEDY_CFG = SamplingConfig(cfg_scale=2.0, temperature=0.0)


def model_on_grid(grid_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=64, vocab_size=48, num_classes=10, grid_size=grid_size,
        token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, registers=RegisterConfig(mode="ntp"),
    )  # fmt: skip
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # separated logits: greedy codes are stable
    return model


@pytest.fixture(scope="module")
def grid16():
    """A 16 x 16 grid (N = 256): four 64-slot flex blocks, so a wrong block count shows."""
    model, labels = model_on_grid(16), torch.tensor([2, 5, 9])
    return model, labels, generate_without_cache(model, labels, GREEDY_CFG)


def stale_caches(model: GPT, rows: int) -> None:
    """Caches for ``rows`` whose every slot holds large garbage: a slot read past t shows in the logits.
    ``generate`` reuses a cache of the same shape as it is."""
    model.setup_caches(rows)
    for layer in model.layers:
        layer.attention.kv_cache.k.normal_(0, 50)
        layer.attention.kv_cache.v.normal_(0, 50)


def test_the_eager_decode_is_the_full_forward_at_every_step(grid16):
    model, _, _ = grid16
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (3,), generator=g)
    codes = torch.randint(0, 48, (3, model.config.num_tokens), generator=g)
    rows, tokens = torch.cat([labels, torch.full_like(labels, 10)]), torch.cat([codes, codes])  # with CFG's null rows
    with torch.no_grad():
        full = model(tokens, rows).logits
        stale_caches(model, rows.shape[0])
        steps = [model.prefill(rows)]
        for t in range(1, model.config.num_tokens):
            steps.append(model.decode(tokens[:, t - 1 : t], torch.tensor([t])))
        model.clear_caches()
    assert (torch.stack(steps, dim=1) - full).abs().max().item() <= 2e-5


def test_the_eager_decode_mask_sees_slots_up_to_t():
    mask = decode_mask(torch.tensor([5]), 8)
    assert mask.shape == (1, 1, 1, 8) and mask.flatten().tolist() == [True] * 6 + [False] * 2


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cached_codes_equal_the_no_cache_reference_greedy_and_sampled(grid16, cfg_scale):
    model, labels, _ = grid16
    for sampling in (SamplingConfig(cfg_scale, temperature=0.0), SamplingConfig(cfg_scale, 1.0, top_k=20, seed=4)):
        stale_caches(model, labels.shape[0] * (2 if sampling.guided else 1))
        assert torch.equal(generate(model, labels, sampling), generate_without_cache(model, labels, sampling))


def test_generate_checks_the_uniform_numbers_shape():
    model = model_on_grid(2)
    with pytest.raises(ValueError, match="uniform must have shape"):
        generate(model, torch.tensor([1]), SamplingConfig(), torch.rand(1, 3))


def test_compiled_decode_equals_the_reference_with_one_graph(grid16):
    # The CPU's inductor runs generate(compile=True) as CUDA does but for the CUDA graphs: the decode
    # step attends with flex (its block-sparse kernel: eager flex ignores the blocks, so only here
    # would a wrong block count show), over stale caches, one graph for every step.
    model, labels, reference = grid16
    assert model.config.num_tokens // FLEX_BLOCK == 4
    torch._dynamo.reset()
    stale_caches(model, 2 * labels.shape[0])
    before = counters["stats"]["unique_graphs"]
    codes = generate(model, labels, GREEDY_CFG, compile=True)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert torch.equal(codes, reference)
    assert model.layers[0].attention.kv_cache is not None  # kept for the next call (a CUDA graph points at it)
    model.clear_caches()


# ---- several decode steps per call (bench/decode_variants.py)


def test_step_groups_cover_every_decode_step_once():
    assert step_groups(64, 4)[:2] == [(1, 4), (5, 4)]
    assert step_groups(64, 4)[-4:] == [(57, 4), (61, 1), (62, 1), (63, 1)]
    assert step_groups(256, 5)[-1] == (251, 5)  # 255 = 51 x 5: no single step
    assert step_groups(4, 5) == [(1, 1), (2, 1), (3, 1)]  # k past the sequence: single steps
    for n, k in [(64, 1), (64, 2), (64, 4), (64, 5), (256, 4), (256, 7)]:
        groups = step_groups(n, k)
        assert [p for i, m in groups for p in range(i, i + m)] == list(range(1, n))
        assert {m for _, m in groups} <= {1, k}
    with pytest.raises(ValueError, match="steps_per_graph"):
        generate_in_groups(model_on_grid(2), torch.tensor([1]), SamplingConfig(), 0)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_k_steps_per_call_give_the_codes_of_one_step_greedy_and_sampled(grid16, k):
    # N - 1 = 255 decode steps: k = 2, 4, 5 leave 1, 3, 0 single steps. Over stale caches: a run of
    # k steps that read a slot before writing it shows.
    model, labels, reference = grid16
    stale_caches(model, 2 * labels.shape[0])
    assert torch.equal(generate_in_groups(model, labels, GREEDY_CFG, k), reference)
    sampled = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(generate_in_groups(model, labels, sampled, k), generate(model, labels, sampled))


def test_compiled_k_steps_equal_the_reference_with_two_graphs(grid16):
    # As on CUDA but for the CUDA graphs: k unrolled steps in one graph (flex: its BlockMask rebuilt
    # from each step's position), the remainder by the single-step graph; none per step.
    model, labels, reference = grid16
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    codes = generate_in_groups(model, labels, GREEDY_CFG, 4, compile=True)
    assert counters["stats"]["unique_graphs"] - before == 2
    assert torch.equal(codes, reference)
    model.clear_caches()


def test_cfg_interval_is_llamagens_guidance_for_the_first_tokens_only():
    # LlamaGen's decode_n_tokens: decode step i (the token at position i + 1) is guided while
    # i <= cfg_interval, after which the conditional rows alone decide; the first token always is.
    model, labels = model_on_grid(4), torch.tensor([1, 7])
    uniform = sample_uniforms(3, range(2), 16)
    sampling = SamplingConfig(cfg_scale=3.0, temperature=1.0, cfg_interval=3)
    rows = torch.cat([labels, torch.full_like(labels, 10)])
    with torch.no_grad():
        model.setup_caches(4)
        reference = [sample_logits(guide(model.prefill(rows), 3.0), uniform=uniform[:, 0])]
        for t in range(1, 16):
            logits = model.decode(torch.cat([reference[-1], reference[-1]])[:, None], torch.tensor([t]))
            logits = guide(logits, 3.0) if t - 1 <= 3 else logits.chunk(2)[0]
            reference.append(sample_logits(logits, uniform=uniform[:, t]))
        model.clear_caches()
    codes = generate(model, labels, sampling, uniform).flatten(1)
    assert torch.equal(codes, torch.stack(reference, dim=1))
    assert torch.equal(generate_without_cache(model, labels, sampling, uniform).flatten(1), codes)
    always = generate(model, labels, sampling.replace(cfg_interval=-1), uniform)
    assert torch.equal(always, generate(model, labels, sampling.replace(cfg_interval=14), uniform))
    assert not torch.equal(always.flatten(1), codes)
    with pytest.raises(ConfigError, match="cfg_interval"):
        SamplingConfig(cfg_interval=-2)
