"""The cached decode's attention settings (``mutor_vision/models/decode.py``): each gives the logits of
the dense-mask SDPA decode and of the full forward at every step, the reference codes through
``generate``, and compiled on the CPU, the eager codes with one graph per static shape. Several
decode steps per call (``steps_per_graph``) give the codes of one step per call, eager and compiled."""

import pytest
import torch
from torch._dynamo.utils import counters

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate
from mutor_vision.models.decode import DecodeAttention, graph_default
from mutor_vision.models.sampling import (
    decode_attention_for,
    decode_loop,
    decode_steps,
    guide,
    next_codes,
    sample_logits,
    step_groups,
)

# Eager flex on the CPU is its unfused reference (and says so): the point here is the numbers.
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")

SETTINGS = ["math", "flex", "flex+block16", "sdpa+bucket64", "math+bucket64", "math+bucket16"]
# Eager flex takes ~50 ms a call on the CPU: it runs at the bucket and block edges of the 16 x 16 grid
# (N = 256) and the other steps run the reference; every other setting runs every step.
EDGES = [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 254, 255]


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
    return model_on_grid(16)


def stale_caches(model: GPT, rows: int) -> None:
    """Caches for ``rows`` whose every slot holds large garbage: a slot read past t shows in the logits."""
    model.setup_caches(rows)
    for layer in model.layers:
        layer.attention.kv_cache.k.normal_(0, 50)
        layer.attention.kv_cache.v.normal_(0, 50)


@torch.no_grad()
def decode_logits(model: GPT, tokens: torch.Tensor, rows: torch.Tensor, attention: DecodeAttention, steps=None):
    """Prefill, then ``decode`` token by token: logits (rows, N, V) for x_1..x_N; ``attention`` at
    ``steps`` (default: all), the reference sdpa at the others."""
    num_tokens, reference = model.config.num_tokens, DecodeAttention()
    stale_caches(model, rows.shape[0])
    logits = [model.prefill(rows)]
    for t in range(1, num_tokens):
        use = attention if steps is None or t in steps else reference
        logits.append(model.decode(tokens[:, t - 1 : t], torch.tensor([t]), use, use.kv_len(t, num_tokens)))
    model.clear_caches()
    return torch.stack(logits, dim=1)


@pytest.fixture(scope="module")
def cfg_batch(grid16):
    """Three images with CFG: [conditional; null-class] rows, the null rows fed the same codes."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (3,), generator=g)
    codes = torch.randint(0, 48, (3, grid16.config.num_tokens), generator=g)
    rows = torch.cat([labels, torch.full_like(labels, grid16.config.num_classes)])
    tokens = torch.cat([codes, codes])
    with torch.no_grad():
        full = grid16(tokens, rows).logits
    return tokens, rows, full, decode_logits(grid16, tokens, rows, DecodeAttention())


def test_the_reference_decode_is_the_full_forward(cfg_batch):
    _, _, full, reference = cfg_batch
    assert (reference - full).abs().max().item() <= 2e-5


@pytest.mark.parametrize("name", SETTINGS)
def test_every_decode_attention_gives_the_reference_logits_at_every_step(grid16, cfg_batch, name):
    tokens, rows, full, reference = cfg_batch
    attention = DecodeAttention.parse(name)
    logits = decode_logits(grid16, tokens, rows, attention, EDGES if attention.kernel == "flex" else None)
    error = (logits - reference).abs().amax(dim=(0, 2))  # per step
    assert error.max().item() <= 2e-5, f"worst step {int(error.argmax())}"
    assert (logits - full).abs().max().item() <= 2e-5


def test_bucket_lengths_and_names():
    bucketed = DecodeAttention.parse("math+bucket64")
    lengths = [bucketed.kv_len(t, 256) for t in (0, 62, 63, 64, 65, 127, 128, 255)]
    assert lengths == [64, 64, 64, 128, 128, 128, 192, 256]
    assert DecodeAttention("sdpa").kv_len(5, 256) == DecodeAttention("flex").kv_len(5, 256) == 256
    assert DecodeAttention.parse("math+bucket20").kv_len(250, 256) == 256  # never past the cache
    for name in ("sdpa", "math", "flex", "flex+block32", "sdpa+bucket64"):
        assert DecodeAttention.parse(name).name == name
    assert DecodeAttention.parse("flex+block64") == DecodeAttention("flex")
    for bad in ("flash", "flex+bucket64", "math+block32", "flex+block8", "sdpa+bucket"):
        with pytest.raises(ValueError):
            DecodeAttention.parse(bad)


def test_auto_is_flex_for_the_graph_and_sdpa_eager():
    assert decode_attention_for("auto", graph=True) == graph_default() == DecodeAttention("flex")
    assert decode_attention_for("auto", graph=False) == DecodeAttention("sdpa")
    assert decode_attention_for("math+bucket64", graph=True) == DecodeAttention("math", bucket=64)
    with pytest.raises(ValueError, match="unknown decode attention"):
        generate(model_on_grid(2), torch.tensor([1]), decode_attention="flash")


@pytest.fixture(scope="module")
def grid8():
    """An 8 x 8 grid (N = 64) and its greedy CFG codes by the no-cache reference: 16-slot buckets and blocks."""
    model, labels = model_on_grid(8), torch.tensor([2, 5, 9])
    return model, labels, generate(model, labels, cfg_scale=2.0, temperature=0.0, use_cache=False)


@pytest.mark.parametrize("name", ["sdpa", "math", "sdpa+bucket16", "math+bucket16"])
def test_greedy_codes_equal_the_no_cache_reference(grid8, name):
    model, labels, reference = grid8
    codes = generate(model, labels, cfg_scale=2.0, temperature=0.0, decode_attention=name)
    assert torch.equal(codes.flatten(1), reference.flatten(1))


@torch.no_grad()
def step_codes(model: GPT, step, labels: torch.Tensor, attention: DecodeAttention) -> torch.Tensor:
    """generate()'s cached loop (greedy, CFG 2.0) over stale caches, each step by ``step``."""
    num_tokens, sampling = model.config.num_tokens, SamplingConfig(cfg_scale=2.0, temperature=0.0)
    rows = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    stale_caches(model, rows.shape[0])
    codes = torch.zeros(labels.shape[0], num_tokens, dtype=torch.long)
    codes[:, 0] = guide(model.prefill(rows), 2.0).argmax(-1)
    positions, uniform = torch.arange(num_tokens), torch.zeros(labels.shape[0])
    for i in range(1, num_tokens):
        kv_len = attention.kv_len(i, num_tokens)
        codes[:, i] = step(model, codes[:, i - 1], positions[i : i + 1], uniform, sampling, True, attention, kv_len)
    model.clear_caches()
    return codes


@pytest.mark.parametrize(("name", "graphs"), [("flex+block16", 1), ("math+bucket32", 2)])
def test_compiled_step_equals_the_reference_with_one_graph_per_shape(grid8, name, graphs):
    # The CPU's inductor, compiled as generate(compile=True) does but for the CUDA graphs: flex becomes
    # its block-sparse kernel (eager flex ignores the blocks, so only here would a wrong block count
    # show); each bucket compiles once, no step recompiles.
    model, labels, reference = grid8
    step = torch.compile(next_codes, fullgraph=True, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    codes = step_codes(model, step, labels, DecodeAttention.parse(name))
    assert counters["stats"]["unique_graphs"] - before == graphs
    assert torch.equal(codes, reference.flatten(1))


# ---- several decode steps per call (steps_per_graph)


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
        generate(model_on_grid(2), torch.tensor([1]), steps_per_graph=0)


@pytest.fixture(scope="module")
def grid8_one_step(grid8):
    """generate()'s eager cached codes, one step per call (k = 1), greedy and sampled, with CFG."""
    model, labels, _ = grid8
    uniform = torch.rand(labels.shape[0], model.config.num_tokens, generator=torch.Generator().manual_seed(7))
    runs = {
        "greedy": dict(cfg_scale=2.0, temperature=0.0),
        "sampled": dict(cfg_scale=2.0, temperature=1.0, top_p=0.9, uniform=uniform),
    }
    return {
        (run, name): generate(model, labels, decode_attention=name, **settings)
        for run, settings in runs.items()
        for name in ("sdpa", "math+bucket16")
    }, runs


@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("run", ["greedy", "sampled"])
@pytest.mark.parametrize("name", ["sdpa", "math+bucket16"])
def test_generate_with_k_steps_per_call_gives_the_codes_of_one_step(grid8, grid8_one_step, k, run, name):
    # N - 1 = 63 decode steps: k = 2, 4, 5 leave 1, 3, 3 single steps; 16-slot buckets put some
    # runs of k across a bucket edge (each step keeps its own KV length).
    model, labels, _ = grid8
    reference, runs = grid8_one_step
    codes = generate(model, labels, decode_attention=name, steps_per_graph=k, **runs[run])
    assert torch.equal(codes, reference[run, name])


@torch.no_grad()
def loop_codes(model: GPT, labels, attention: DecodeAttention, k: int, one_step=next_codes, k_steps=decode_steps):
    """generate()'s cached loop (greedy, CFG 2.0) over stale caches, k steps per ``k_steps`` call."""
    num_tokens, sampling = model.config.num_tokens, SamplingConfig(cfg_scale=2.0, temperature=0.0)
    rows = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    stale_caches(model, rows.shape[0])
    codes = torch.zeros(labels.shape[0], num_tokens, dtype=torch.long)
    codes[:, 0] = sample_logits(guide(model.prefill(rows), 2.0), temperature=0.0)
    uniform = torch.zeros(num_tokens, labels.shape[0])
    decode_loop(model, codes, uniform, sampling, True, attention, k, one_step, k_steps)
    model.clear_caches()
    return codes


def test_k_steps_over_stale_caches_give_the_reference_codes(grid8):
    # Every slot past t holds large garbage: a run of k steps that read a slot before writing it shows.
    model, labels, reference = grid8
    for k in (3, 4):
        assert torch.equal(loop_codes(model, labels, DecodeAttention("sdpa"), k), reference.flatten(1))


@pytest.mark.parametrize(("name", "k"), [("flex+block16", 4), ("math+bucket32", 2)])
def test_compiled_k_steps_equal_the_reference_with_a_bounded_number_of_graphs(grid8, name, k):
    # As generate(compile=True, steps_per_graph=k) runs on CUDA but for the CUDA graphs: k unrolled
    # steps in one graph (flex: its BlockMask rebuilt from each step's position), the remainder by
    # the single-step graph; a graph per distinct (k, KV lengths), none per step.
    model, labels, reference = grid8
    attention, num_tokens = DecodeAttention.parse(name), model.config.num_tokens
    torch._dynamo.reset()  # next_codes' graphs of the tests above would serve the single steps
    one_step = torch.compile(next_codes, fullgraph=True, dynamic=False)
    k_steps = torch.compile(decode_steps, fullgraph=True, dynamic=False)
    shapes = {tuple(attention.kv_len(p, num_tokens) for p in range(i, i + n)) for i, n in step_groups(num_tokens, k)}
    before = counters["stats"]["unique_graphs"]
    codes = loop_codes(model, labels, attention, k, one_step, k_steps)
    assert counters["stats"]["unique_graphs"] - before == len(shapes)  # flex: 2; math+bucket32: 4
    assert torch.equal(codes, reference.flatten(1))
