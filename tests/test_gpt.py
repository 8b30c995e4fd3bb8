"""The LlamaGen-compatible GPT: sizes, RoPE, register invariance, KV cache, backends, checkpoints."""

import argparse
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mutor_vision.config import ConfigError, from_dict
from mutor_vision.core.draw import cumulative, draw
from mutor_vision.core.loss import combined_loss
from mutor_vision.core.registers import Offsets, grid_layout
from mutor_vision.models import (
    GPT,
    CheckpointError,
    GPTConfig,
    RegisterConfig,
    SamplingConfig,
    generate,
    sample_logits,
    sample_uniforms,
)
from mutor_vision.models.config import ffn_hidden_dim
from mutor_vision.models.rope import apply_rope, rope_2d_table
from mutor_vision.models.sampling import guide


def tiny_config(**changes) -> GPTConfig:
    base = dict(
        size=None,
        n_layer=2,
        n_head=2,
        dim=64,
        vocab_size=48,
        num_classes=10,
        grid_size=4,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
        class_dropout=0.0,
        registers=RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=None),
    )
    base.update(changes)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**changes))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero head would make every logit 0
    return model.eval()


def architecture(config: GPTConfig) -> dict:
    """The config as from_pretrained overrides (no size: the fields say it all)."""
    return {k: v for k, v in vars(config).items() if k != "size"}


def batch(config: GPTConfig, size: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.num_tokens), generator=g)
    labels = torch.randint(0, config.num_classes, (size,), generator=g)
    return tokens, labels


# ---------------------------------------------------------------- sizes and init


def test_gpt_b_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(GPTConfig(size="GPT-B"))
    assert model.num_parameters(include_register=False) == 110_888_448
    assert model.num_parameters() == 110_888_448 + 768
    assert len(model.state_dict()) == 88 + 1


@pytest.mark.parametrize(
    ("size", "params"), [("GPT-L", 342_910_976), ("GPT-XL", 774_699_520), ("GPT-XXL", 1_410_972_672)]
)
def test_other_sizes_parameter_count(size, params):
    with torch.device("meta"):
        assert GPT(GPTConfig(size=size)).num_parameters(include_register=False) == params


def test_ffn_hidden_rounding():
    assert [ffn_hidden_dim(d) for d in (768, 1024, 1280, 1536)] == [2048, 2816, 3584, 4096]


def test_init_zero_head_gives_uniform_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=16384 // 64))
    tokens, labels = batch(model.config)
    loss = model(tokens, labels, return_loss=True).loss["loss"]
    assert math.isclose(loss.item(), math.log(256), rel_tol=1e-6)
    assert model.register_embedding.std().item() == pytest.approx(0.02, rel=0.5)


# ---------------------------------------------------------------- RoPE


def test_rope_table_matches_the_documented_formula():
    cos, sin = rope_2d_table(16, 64)
    assert cos.shape == (257, 32)
    assert (cos[0] == 0).all() and (sin[0] == 0).all()  # class row: all zeros, not identity
    freqs = torch.tensor([10000 ** (-2 * k / 32) for k in range(16)])
    for p in (1, 17, 100, 256):
        i, j = divmod(p - 1, 16)
        angles = torch.cat([i * freqs, j * freqs])
        torch.testing.assert_close(cos[p], angles.cos())
        torch.testing.assert_close(sin[p], angles.sin())


def test_apply_rope_interleaved_pairs():
    x = torch.randn(1, 1, 1, 8)
    theta = torch.tensor([0.3, -1.2, 0.7, 2.0])
    out = apply_rope(x, theta.cos(), theta.sin())
    a, b = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], a * theta.cos() - b * theta.sin())
    torch.testing.assert_close(out[..., 1::2], b * theta.cos() + a * theta.sin())


def test_rmsnorm_matches_llamagen_formula():
    model = tiny_model()
    norm = model.layers[0].attention_norm
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 64)
    reference = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), reference)


# ---------------------------------------------------------------- forward and registers


def test_forward_shapes_and_next_token_alignment():
    model = tiny_model()
    tokens, labels = batch(model.config)
    out = model(tokens, labels)
    assert out.logits.shape == (3, 16, 48) and out.logits.dtype == torch.float32
    assert out.register_logits is None
    # logits[:, t] depends only on tokens[:, :t] (class at input 0): changing x_t leaves them.
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 48
    out2 = model(changed, labels)
    torch.testing.assert_close(out.logits[:, :6], out2.logits[:, :6])
    assert not torch.allclose(out.logits[:, 6:], out2.logits[:, 6:])


@pytest.mark.parametrize(
    "registers",
    [
        RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=None),
        RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=5),
        RegisterConfig(mode="mutor1d", d_max=4, num_registers=None),
        RegisterConfig(mode="mutor1d", d_max=4, num_registers=7, valid_slots_only=True),
    ],
)
def test_registers_leave_regular_logits_unchanged(registers):
    model = tiny_model(registers=registers)
    tokens, labels = batch(model.config)
    plain = model(tokens, labels).logits
    layout = model.register_layout(3, generator=torch.Generator().manual_seed(1))
    out = model(tokens, labels, layout)
    assert out.register_logits.shape == (3, layout.num_registers, 48)
    assert (out.logits - plain).abs().max().item() <= 1e-5


def test_register_logits_equal_an_interleaved_reference():
    # A register's logits equal a plain forward in which the register vector replaces the
    # embedding at its position, attending to the prefix up to its anchor plus itself.
    model = tiny_model()
    tokens, labels = batch(model.config, size=1)
    d = 5  # (d_h, d_w) = (2, 2) on a 4-wide grid
    layout = grid_layout(Offsets(torch.tensor([d]), torch.tensor([1]), torch.tensor([1])), 4, 4)
    out = model(tokens, labels, layout)
    anchor = 6
    x = torch.cat([model.cls_embedding(labels)[:, None], model.tok_embeddings(tokens[:, :anchor])], 1)
    x = torch.cat([x, model.register_embedding.view(1, 1, -1)], 1)  # anchor + 1 regular, then the register
    positions = torch.tensor([*range(anchor + 1), anchor + d - 1])
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    for layer in model.layers:
        x = layer(x, cos, sin, None, None)
    expected = model.output(model.norm(x[:, -1]))
    torch.testing.assert_close(out.register_logits[:, anchor], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_equals_dense_sdpa_forward_on_cpu():
    model = tiny_model(registers=RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=6))
    tokens, labels = batch(model.config)
    layout = model.register_layout(3, generator=torch.Generator().manual_seed(2))
    dense = model(tokens, labels, layout)
    model.config.attention = "flex"
    with torch.no_grad():
        flex = model(tokens, labels, layout)
    torch.testing.assert_close(flex.logits, dense.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex.register_logits, dense.register_logits, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_is_a_clear_error():
    model = tiny_model(attention="flex").train()
    tokens, labels = batch(model.config)
    with pytest.raises(RuntimeError, match="attention: sdpa"):
        model(tokens, labels, model.register_layout(3))


def test_register_vector_gets_gradient_only_through_register_logits():
    model = tiny_model()
    tokens, labels = batch(model.config)
    layout = model.register_layout(3, generator=torch.Generator().manual_seed(0))
    out = model(tokens, labels, layout)
    out.logits.sum().backward(retain_graph=True)
    assert model.register_embedding.grad is None or (model.register_embedding.grad == 0).all()
    out.register_logits[layout.valid].sum().backward()
    assert model.register_embedding.grad.abs().sum() > 0


def test_loss_combines_through_the_core():
    model = tiny_model()
    tokens, labels = batch(model.config)
    layout = model.register_layout(3, generator=torch.Generator().manual_seed(0))
    out = model(tokens, labels, layout)
    trained = model(tokens, labels, layout, return_loss=True)
    assert trained.logits is None and set(trained.loss) == {"loss", "loss_ntp", "loss_reg"}
    ntp = F.cross_entropy(out.logits.reshape(-1, 48), tokens.reshape(-1))
    targets = F.pad(tokens, (1, 0)).gather(1, layout.target.clamp(max=16))
    reg = F.cross_entropy(out.register_logits[layout.valid], targets[layout.valid])
    torch.testing.assert_close(trained.loss["loss"], 0.5 * ntp + 0.5 * reg)
    torch.testing.assert_close(trained.loss["loss_ntp"], ntp)
    torch.testing.assert_close(trained.loss["loss_reg"], reg)


def test_class_dropout_and_registers_see_null_class():
    model = tiny_model(class_dropout=0.5).train()
    torch.manual_seed(0)
    tokens, labels = batch(model.config, size=64)
    out = model(tokens, labels, model.register_layout(64))
    null_labels = torch.full_like(labels, 10)
    with torch.no_grad():
        model.eval()
        conditional = model(tokens, labels).logits
        null = model(tokens, null_labels).logits
    dropped = (out.logits[:, 0] - null[:, 0]).abs().amax(-1) < 1e-5
    kept = (out.logits[:, 0] - conditional[:, 0]).abs().amax(-1) < 1e-5
    assert (dropped | kept).all() and 15 < dropped.sum() < 49


def test_token_dropout_reaches_registers():
    model = tiny_model(token_dropout=0.5).train()
    tokens, labels = batch(model.config)
    layout = model.register_layout(3, generator=torch.Generator().manual_seed(0))
    a = model(tokens, labels, layout).register_logits
    b = model(tokens, labels, layout).register_logits
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------- KV cache and sampling


def test_kv_cache_logits_equal_full_forward():
    model = tiny_model()
    tokens, labels = batch(model.config)
    full = model(tokens, labels).logits
    model.setup_caches(3)
    cached = [model.prefill(labels)]
    for t in range(1, 16):
        cached.append(model.decode(tokens[:, t - 1 : t], torch.tensor([t])))
    model.clear_caches()
    assert (torch.stack(cached, 1) - full).abs().max().item() <= 1e-5


def test_generate_gives_a_grid_of_codes_and_leaves_the_model_as_it_was():
    model = tiny_model().train()
    codes = generate(model, torch.tensor([1, 2]), SamplingConfig(cfg_scale=2.0, seed=0))
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long and int(codes.max()) < 48
    assert model.training and model.layers[0].attention.kv_cache is None  # mode restored, eager cache freed
    assert torch.equal(codes, generate(model.eval(), torch.tensor([1, 2]), SamplingConfig(cfg_scale=2.0, seed=0)))


def test_cfg_scale_one_is_conditional_sampling():
    # generate() runs no null-class rows at scale 1: guiding at 1 would draw the same codes.
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(256, 48, generator=g) * 3, torch.randn(256, 48, generator=g) * 3
    uniform = torch.rand(256, generator=g)
    guided = sample_logits(guide(torch.cat([cond, uncond]), 1.0), uniform=uniform)
    assert torch.equal(guided, sample_logits(cond, uniform=uniform))
    assert not SamplingConfig(cfg_scale=1.0).guided and SamplingConfig(cfg_scale=4.0).guided
    model, labels = tiny_model(), torch.tensor([3, 4, 5])
    plain = generate(model, labels, SamplingConfig(seed=7))
    assert not torch.equal(plain, generate(model, labels, SamplingConfig(cfg_scale=4.0, seed=7)))


def test_an_image_depends_on_its_own_numbers_only():
    # Per-image uniforms: the same image comes out whatever batch it is sampled in (eval reruns).
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 3, 4])
    settings = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=20, seed=3)
    together = generate(model, labels, settings, uniform=sample_uniforms(3, range(5), 16))
    alone = generate(model, labels[3:4], settings, uniform=sample_uniforms(3, [3], 16))
    pair = generate(model, labels[[4, 1]], settings, uniform=sample_uniforms(3, [4, 1], 16))
    assert torch.equal(together[3], alone[0]) and torch.equal(together[[4, 1]], pair)
    assert not torch.equal(together[0], together[1])


def test_sampling_seeded_and_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and len(a.unique()) == 5
    assert set(sample_logits(logits, top_k=2).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_logits(logits, top_p=0.8).tolist()) == {0, 1}
    assert set(sample_logits(logits, temperature=0).tolist()) == {0}
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_inverse_cdf_draws_follow_the_distribution():
    # 40,000 draws against the softmax: a chi-square test (p > 1e-4 unless the draw is biased).
    from scipy.stats import chisquare

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    draws = sample_logits(logits.repeat(40_000, 1), generator=torch.Generator().manual_seed(1))
    observed = torch.bincount(draws, minlength=6).double()
    expected = logits[0].softmax(-1).double() * 40_000
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-4
    # Edges: numbers at 0 and just below 1 pick the first and the last token with mass, never past it.
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    assert draw(probs, torch.tensor([0.0])).item() == 1
    assert draw(probs, torch.tensor([1.0 - 2**-24])).item() == 2
    assert draw(probs, torch.tensor([1.0])).item() == 2  # rounding at the total


def test_draw_at_the_vq16_vocabulary_is_the_inverse_cdf_and_never_picks_a_zero():
    # V = 16,384: the cdf runs as two short scans (cumulative) and the pick as a reduction, the form
    # inductor compiles on CUDA. Against float64 searchsorted; rows differ only at rounding level.
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(256, 16384, generator=generator) ** 8
    probs[:, ::7] = 0  # filtered-out tokens
    probs /= probs.sum(-1, keepdim=True)
    assert torch.allclose(cumulative(probs), probs.cumsum(-1), atol=1e-5)
    assert torch.equal(cumulative(probs[:, :1000]), probs[:, :1000].cumsum(-1))  # V not a multiple: one scan
    uniform = torch.rand(256, generator=generator)
    cdf = probs.double().cumsum(-1)
    reference = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    picked = draw(probs, uniform)
    assert (picked == reference).float().mean() >= 0.98
    assert (probs.gather(1, picked[:, None]) > 0).all()
    # A cdf whose rounding dips by an ulp at a zero token still never picks it.
    assert draw(torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([0.5])).item() == 2


# ---------------------------------------------------------------- checkpoints


def official_state_dict(config: GPTConfig) -> dict[str, torch.Tensor]:
    """LlamaGen's key layout built from the documented names and shapes (docs/compatibility.md §1)."""
    d, h, v = config.dim, config.ffn_hidden, config.vocab_size
    state = {
        "cls_embedding.embedding_table.weight": torch.randn(config.num_classes + 1, d),
        "tok_embeddings.weight": torch.randn(v, d),
        "norm.weight": torch.randn(d),
        "output.weight": torch.randn(v, d),
    }
    for i in range(config.n_layer):
        state |= {
            f"layers.{i}.attention.wqkv.weight": torch.randn(3 * d, d),
            f"layers.{i}.attention.wo.weight": torch.randn(d, d),
            f"layers.{i}.feed_forward.w1.weight": torch.randn(h, d),
            f"layers.{i}.feed_forward.w3.weight": torch.randn(h, d),
            f"layers.{i}.feed_forward.w2.weight": torch.randn(d, h),
            f"layers.{i}.attention_norm.weight": torch.randn(d),
            f"layers.{i}.ffn_norm.weight": torch.randn(d),
        }
    return state


def test_official_layout_loads_strictly_in_every_container(tmp_path, caplog):
    config = tiny_config()
    state = official_state_dict(config)
    prefixed = {f"module._orig_mod.{k}": t for k, t in state.items()} | {"freqs_cis": torch.randn(17, 16, 2)}
    forms = {
        "raw.pt": state,
        "model.pt": {"model": state, "optimizer": {}, "steps": 5},
        "module.pt": {"module": prefixed},
        "state_dict.pt": {"state_dict": state},
    }
    overrides = architecture(config)
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
        with caplog.at_level(logging.WARNING):
            model = GPT.from_pretrained(tmp_path / name, size=None, **overrides)
        assert "register_embedding" in caplog.text
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value), (name, key)


def test_namespace_pickle_needs_trust(tmp_path):
    config = tiny_config()
    path = tmp_path / "ddp.pt"
    torch.save({"model": official_state_dict(config), "args": argparse.Namespace(lr=1e-4)}, path)
    overrides = architecture(config)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*trust=True"):
        GPT.from_pretrained(path, size=None, **overrides)
    with pytest.warns(UserWarning, match="trust"):
        GPT.from_pretrained(path, size=None, trust=True, **overrides)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    config = tiny_config()
    state = official_state_dict(config)
    state.pop("layers.1.ffn_norm.weight")
    state["layers.0.attention.wo.weight"] = torch.randn(64, 32)
    state["extra.weight"] = torch.randn(3)
    torch.save(state, tmp_path / "bad.pt")
    overrides = architecture(config)
    with pytest.raises(CheckpointError) as error:
        GPT.from_pretrained(tmp_path / "bad.pt", size=None, **overrides)
    text = str(error.value)
    assert "layers.1.ffn_norm.weight" in text and "extra.weight" in text and "(64, 32) vs model (64, 64)" in text


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(official_state_dict(tiny_config()), good)
    data = good.read_bytes()
    for name, payload in {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"not a checkpoint" * 10}.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable PyTorch checkpoint"):
            GPT.from_pretrained(tmp_path / name, size=None, **architecture(tiny_config()))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="safetensors"):
        GPT.from_pretrained(tmp_path / "broken.safetensors", size=None, **architecture(tiny_config()))
    with pytest.raises(CheckpointError, match="no such"):
        GPT.from_pretrained(tmp_path / "missing.pt")


def test_own_export_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == model.config
    tokens, labels = batch(model.config)
    assert torch.equal(loaded(tokens, labels).logits, model(tokens, labels).logits)
    assert torch.equal(loaded.register_embedding, model.register_embedding)
    # A bare safetensors state dict loads too, with the architecture given.
    save_file(dict(model.state_dict()), tmp_path / "bare.safetensors")
    overrides = architecture(model.config)
    bare = GPT.from_pretrained(tmp_path / "bare.safetensors", size=None, **overrides)
    assert torch.equal(bare.register_embedding, model.register_embedding)


# ---------------------------------------------------------------- config


def test_config_from_dict_validates():
    config = from_dict(GPTConfig, {"size": "GPT-B", "registers": {"mode": "mutor1d", "d_max": 3}})
    assert config.dim == 768 and config.registers.mode == "mutor1d"
    with pytest.raises(ConfigError, match=r"registers\.d_maxx"):
        from_dict(GPTConfig, {"registers": {"d_maxx": 3}})
    with pytest.raises(ConfigError, match="n_head"):
        from_dict(GPTConfig, {"n_head": "twelve"})
    with pytest.raises(ConfigError, match="attention"):
        from_dict(GPTConfig, {"attention": "xformers"})
    with pytest.raises(ConfigError, match="weight"):
        from_dict(GPTConfig, {"registers": {"weight": 2.0}})
    with pytest.raises(ConfigError, match="size"):
        from_dict(GPTConfig, {"size": "GPT-M"})


# ---------------------------------------------------------------- compiled training forward


def count_compiles(model: torch.nn.Module):
    """``torch.compile(model, fullgraph=True)`` with a backend that records every graph it is given."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward  # run the captured graph eagerly: guards and breaks are what we test

    return torch.compile(model, backend=backend, fullgraph=True), graphs


@pytest.mark.parametrize(("attention", "head_chunk_size"), [("sdpa", 0), ("sdpa", 40), ("flex", 0)])
def test_compiled_mutor_forward_has_no_graph_break_or_recompile_across_layouts(attention, head_chunk_size):
    # fullgraph=True turns any graph break into an error; fresh random layouts (new offsets, slots,
    # BlockMask closures) must reuse the one graph. Flex runs forward only here (no CPU backward).
    # head_chunk_size: the chunked head + CE (an autograd.Function with a loop) traces as well.
    registers = RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=6)
    model = tiny_model(attention=attention, registers=registers, head_chunk_size=head_chunk_size)
    model.train(attention == "sdpa")
    compiled, graphs = count_compiles(model)
    tokens, labels = batch(model.config)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        layout = model.register_layout(3, generator=generator)
        mask = model.attention_mask(layout, requires_grad=attention == "sdpa")  # outside the compiled region
        with torch.set_grad_enabled(attention == "sdpa"):
            torch.manual_seed(step)
            out = compiled(tokens, labels, layout, mask, return_loss=True).loss
            if attention == "sdpa":
                out["loss"].backward()
            torch.manual_seed(step)
            reference = model(tokens, labels, layout, mask, return_loss=True).loss
        for name in ("loss", "loss_ntp", "loss_reg"):  # loss_reg: the register rows' path
            torch.testing.assert_close(out[name], reference[name])
        assert len(graphs) == 1, f"recompiled at step {step}"


@pytest.mark.parametrize("mode", ["ntp", "mutor2d"])
def test_chunked_head_loss_equals_the_loss_of_the_logits(mode):
    registers = RegisterConfig(mode=mode, d_max_2d=3, num_registers=6)
    whole, chunked = tiny_model(registers=registers), tiny_model(registers=registers, head_chunk_size=7)
    tokens, labels = batch(whole.config)
    layout = whole.register_layout(3, generator=torch.Generator().manual_seed(1))
    expected = whole(tokens, labels, layout, return_loss=True)
    got = chunked(tokens, labels, layout, return_loss=True)
    assert got.logits is None and got.register_logits is None  # the loss only: no logits whole
    expected, got = expected.loss, got.loss
    assert set(got) == set(expected) == {"loss", "loss_ntp", "loss_reg"}
    for name in ("loss", "loss_ntp", "loss_reg"):
        torch.testing.assert_close(got[name], expected[name])
    out = whole(tokens, labels, layout)
    register_labels = None if layout is None else layout.register_labels(F.pad(tokens, (1, 0)))
    parts = combined_loss(out.logits, tokens, out.register_logits, register_labels, 0.5)
    torch.testing.assert_close(expected["loss"], parts.loss)
    expected["loss"].backward()
    got["loss"].backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_training_flop_count_worked_example():
    config = GPTConfig(size="GPT-B")
    with torch.device("meta"):
        model = GPT(config)
    embeddings = model.tok_embeddings.weight.numel() + model.cls_embedding.embedding_table.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert config.matmul_parameters() == 97_517_568 == model.num_parameters(False) - embeddings - norms
    expected = 6 * 97_517_568 * 336 + 12 * 12 * 768 * 336**2  # 1.966e11 weights + 1.249e10 attention
    assert config.train_flops_per_sample(336) == expected and round(expected / 1e9) == 209
