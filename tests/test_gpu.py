"""The GPU tier (``make test-gpu``): the paths that only run on CUDA.

FlexAttention with BlockMasks (compiled), bf16 autocast, compiled training, FSDP2, CUDA sampling,
and ``eval/fid.py`` on the GPU. On a machine without CUDA every test here is skipped with the
reason; the CPU suite covers the same code paths in their CPU form.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COLORS, ROOT, make_image_folder

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate
from mutor_vision.shards import write_synthetic_shards

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: needs CUDA (make test-gpu on a GPU machine)"),
]
TINY = ROOT / "configs" / "c2i" / "tiny_cpu.yaml"


def small_config(attention: str = "auto", registers: int | None = 80, vocab_size: int = 1024) -> GPTConfig:
    """A 4-layer, 256-wide model on the paper's geometry: 16×16 grid, D = 4, R = 80."""
    return GPTConfig(
        size=None, n_layer=4, n_head=4, dim=256, vocab_size=vocab_size, num_classes=10, grid_size=16,
        token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, attention=attention,
        registers=RegisterConfig(mode="mutor2d", d_max_2d=4, num_registers=registers),
    )  # fmt: skip


def small_model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(small_config(**changes))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # separated logits: greedy codes are stable
    return model.cuda()


def small_batch(config: GPTConfig, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (size, config.num_tokens), generator=g)
    labels = torch.randint(0, config.num_classes, (size,), generator=g)
    return tokens.cuda(), labels.cuda()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def launch_then_resume(accelerate_config: str, script: str, args: list[str], length: tuple[str, int, int]) -> str:
    """One-process ``accelerate launch`` of ``script`` with ``configs/accelerate/<accelerate_config>``:
    ``key=first``, then ``key=second`` with ``--resume auto --allow-change key``; the resumed run's stderr."""
    key, first, second = length
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "configs" / "accelerate" / accelerate_config), "--num_processes", "1", script]
    runs = [[f"{key}={first}"], [f"{key}={second}", "--resume", "auto", "--allow-change", key]]
    for extra in runs:
        done = subprocess.run([*launch, *args, *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("registers", [80, None])
def test_flex_equals_sdpa_register_attention_in_bf16(registers):
    flex, sdpa = small_model(attention="flex", registers=registers), small_model(attention="sdpa", registers=registers)
    tokens, labels = small_batch(flex.config)
    layout = flex.register_layout(8, generator=torch.Generator().manual_seed(1), device="cuda")
    outputs, grads = [], []
    for model in (flex, sdpa):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, labels, layout)
            loss = model(tokens, labels, layout, return_loss=True).loss["loss"]
        loss.backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert relative_error(outputs[0].logits, outputs[1].logits) < 2e-2
    assert relative_error(outputs[0].register_logits, outputs[1].register_logits) < 2e-2
    assert grads[0].keys() == grads[1].keys() and "register_embedding" in grads[0]
    for name in grads[0]:
        assert relative_error(grads[0][name], grads[1][name]) < 5e-2, name


def test_kv_cache_decode_equals_full_forward_on_cuda():
    # Eager: SDPA with the dense mask over the whole cache.
    model = small_model().eval()
    tokens, labels = small_batch(model.config, size=4)
    with torch.no_grad():
        full = model(tokens, labels).logits
        model.setup_caches(4)
        steps = [model.prefill(labels)]
        for t in range(1, model.config.num_tokens):
            steps.append(model.decode(tokens[:, t - 1 : t], torch.tensor([t], device="cuda")))
        model.clear_caches()
    assert (torch.stack(steps, 1) - full).abs().max().item() < 1e-3


def test_compiled_bf16_decode_matches_eager_sdpa():
    # bf16 as the benchmarks run: the compiled step's kernel (inductor's flex decoding, blocks past t
    # skipped) against the eager dense-mask decode, every step, over stale caches.
    model = small_model().to(torch.bfloat16).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    tokens, labels = small_batch(model.config, size=8)
    compiled = torch.compile(model.decode, fullgraph=True, dynamic=False)
    logits = {}
    with torch.no_grad():
        for key, decode in [("eager", model.decode), ("compiled", compiled)]:
            model.setup_caches(8)
            for layer in model.layers:
                layer.attention.kv_cache.k.normal_(0, 10)
                layer.attention.kv_cache.v.normal_(0, 10)
            steps = [model.prefill(labels)]
            for t in range(1, model.config.num_tokens):
                steps.append(decode(tokens[:, t - 1 : t], torch.tensor([t], device="cuda")))
            model.clear_caches()
            logits[key] = torch.stack(steps, 1)
    for t in (0, 1, 63, 64, 65, 127, 128, 255):
        assert relative_error(logits["compiled"][:, t], logits["eager"][:, t]) < 2e-2, t
    assert relative_error(logits["compiled"], logits["eager"]) < 2e-2


@pytest.mark.parametrize("head_chunk_size", [0, 1024])
def test_compiled_mutor2d_step_has_no_graph_break_or_recompile(head_chunk_size):
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    model = small_model(attention="flex").train()
    model.config.head_chunk_size = head_chunk_size  # read at each forward
    compiled = torch.compile(model, backend=counting_inductor, fullgraph=True)  # a graph break would raise
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        tokens, labels = small_batch(model.config, seed=step)
        layout = model.register_layout(8, generator=generator, device="cuda")
        mask = model.attention_mask(layout)  # built outside the compiled region, as the trainer does
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(tokens, labels, layout, mask, return_loss=True)
        out.loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            warm = len(graphs)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs) == warm == 1, f"{len(graphs)} graphs compiled ({warm} at warm-up)"


def test_register_layout_reaches_the_gpu_without_waiting_for_it():
    # The trainer draws each step's layout on the host; moving it must not block on the GPU's queue
    # (a blocking copy would idle the GPU while the host then builds the mask).
    model = small_model()
    expected = model.register_layout(8, generator=torch.Generator().manual_seed(3))
    busy = torch.randn(2048, 2048, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            busy = busy @ busy / 2048  # queued work the layout's copies must not wait for
        layout = model.register_layout(8, generator=torch.Generator().manual_seed(3), device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layout.anchor.is_cuda and layout.valid.is_cuda
    for name in ("anchor", "target", "position", "valid", "offset", "length", "prefix_len"):
        assert torch.equal(getattr(layout, name).cpu(), getattr(expected, name)), name


def test_batches_reach_the_gpu_without_waiting_for_it():
    from mutor_vision.training.runtime import batch_to_device

    batch = (torch.arange(12).view(3, 4), {"labels": torch.tensor([1, 2, 3]), "name": "kept"})
    busy = torch.randn(2048, 2048, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy = busy @ busy
        moved = batch_to_device(batch, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved[0].is_cuda and torch.equal(moved[0].cpu(), batch[0])
    assert torch.equal(moved[1]["labels"].cpu(), batch[1]["labels"]) and moved[1]["name"] == "kept"


def test_chunked_head_loss_in_bf16_matches_whole_logits_and_saves_their_memory():
    from dataclasses import replace

    config = replace(small_config(), vocab_size=8192)  # logits (16, 336, 8192) float32: 176 MiB a copy
    models = []
    for chunk in (0, 1024):
        torch.manual_seed(0)
        models.append(GPT(replace(config, head_chunk_size=chunk)).cuda().train())
    tokens, labels = small_batch(config, size=16)
    layout = models[0].register_layout(16, generator=torch.Generator().manual_seed(1), device="cuda")
    mask = models[0].attention_mask(layout)
    losses, grads, peaks = [], [], []
    for model in models:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = model(tokens, labels, layout, mask, return_loss=True).loss
        parts["loss"].backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        losses.append(parts)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name in ("loss", "loss_ntp", "loss_reg"):
        assert relative_error(losses[1][name], losses[0][name]) < 1e-2, name
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) < 5e-2, name
    logits_copy = 16 * (config.num_tokens + 80) * config.vocab_size * 4
    assert peaks[1] < peaks[0] - logits_copy, f"peaks {peaks} bytes; one float32 logits copy is {logits_copy}"


def test_compiled_bf16_training_learns_then_resumes(tmp_path):
    from mutor_vision.config import load_yaml
    from mutor_vision.training.c2i import train
    from mutor_vision.training.config import TrainConfig

    data = tmp_path / "shards"
    write_synthetic_shards(data, num_shards=2, per_shard=4, grid=8, vocab_size=16, num_classes=10, num_crops=1)
    overrides = [f"data.root={data}", f"out_dir={tmp_path / 'run'}", "device=auto", "mixed_precision=bf16"]
    overrides += ["compile=true", "model.attention=auto", "save_every=10", "tensorboard=false"]
    overrides += ["model.token_dropout=0.0", "model.resid_dropout=0.0", "model.ffn_dropout=0.0"]
    overrides += ["model.class_dropout=0.0"]
    first = train(load_yaml(TrainConfig, TINY, [*overrides, "steps=30"]))
    assert first.step == 30 and first.reason == "completed"
    assert sum(first.losses[-5:]) / 5 < 0.9 * sum(first.losses[:5]) / 5, first.losses  # 0.83 in fp32 on CPU
    more = train(load_yaml(TrainConfig, TINY, [*overrides, "steps=40"]), resume="auto", allow_change=["steps"])
    assert more.step == 40 and len(more.losses) == 10
    assert GPT.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000040" / "export") is not None


def test_fsdp2_one_process_saves_and_resumes(tmp_path):
    data = tmp_path / "shards"
    write_synthetic_shards(data, num_shards=2, per_shard=8, grid=8, vocab_size=16, num_classes=10)
    args = ["--config", str(TINY), f"data.root={data}", f"out_dir={tmp_path / 'run'}", "device=auto"]
    args += ["mixed_precision=bf16", "save_every=2", "tensorboard=false"]
    resumed = launch_then_resume("fsdp2_xl.yaml", "train_c2i.py", args, ("steps", 4, 6))
    assert "resumed from" in resumed and "at step 4" in resumed
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["step"] == 6
    assert GPT.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000006" / "export") is not None


def test_compiled_greedy_sampling_equals_eager_on_cuda():
    # The CUDA-graph decode (flex) against the eager one (SDPA), greedy and sampled.
    model = small_model().eval()
    labels = torch.arange(8, device="cuda") % model.config.num_classes
    greedy, sampled = SamplingConfig(cfg_scale=2.0, temperature=0.0), SamplingConfig(2.0, 1.0, top_k=100, seed=3)
    assert torch.equal(generate(model, labels, greedy), generate(model, labels, greedy, compile=True))
    assert torch.equal(generate(model, labels, sampled), generate(model, labels, sampled, compile=True))
    # The graph path keeps its KV cache for the next call at this batch size: other labels, same result.
    other = labels.flip(0)
    assert torch.equal(generate(model, other, greedy, compile=True), generate(model, other, greedy))
    model.clear_caches()


def test_compiled_sampling_with_four_steps_per_graph_equals_one_step():
    # bench/decode_variants.py's steps_per_graph=4: four unrolled decode steps captured in one CUDA
    # graph (a BlockMask per step, the KV cache written in place four times per replay), the last
    # 255 mod 4 = 3 steps by the single-step graph; the codes of one step per graph, greedy and
    # sampled, then over the kept caches.
    sys.path.insert(0, str(ROOT / "bench"))
    from decode_variants import generate_in_groups

    model = small_model().eval()
    labels = torch.arange(8, device="cuda") % model.config.num_classes
    for sampling in (SamplingConfig(2.0, temperature=0.0), SamplingConfig(2.0, 1.0, top_k=100, seed=3)):
        one = generate(model, labels, sampling, compile=True)
        assert torch.equal(one, generate_in_groups(model, labels, sampling, 4, compile=True))
    greedy = SamplingConfig(2.0, temperature=0.0)
    other = labels.flip(0)
    assert torch.equal(generate_in_groups(model, other, greedy, 4, compile=True), generate(model, other, greedy))
    model.clear_caches()


@pytest.mark.parametrize("filters", [dict(), dict(top_k=1000), dict(top_p=0.9)])
def test_compiled_sampling_at_the_vq16_vocabulary_equals_eager(filters):
    # V = 16,384 is where inductor's scan and searchsorted lowerings once failed on CUDA (the draw's
    # cdf and pick: core/draw.py); a smaller vocabulary never reached them.
    model = small_model(vocab_size=16384).eval()
    labels = torch.arange(8, device="cuda") % model.config.num_classes
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, seed=5, **filters)
    compiled = generate(model, labels, sampling, compile=True)
    eager = generate(model, labels, sampling)
    model.clear_caches()
    # The same uniform numbers: codes agree but where float rounding moves a draw across a boundary
    # (after which that image's sequence diverges), so most images match whole.
    assert (compiled == eager).all(dim=(1, 2)).float().mean() >= 0.75


def test_eval_fid_end_to_end_on_cuda(tmp_path):
    from eval import fid as fid_cli
    from mutor_vision.evaluation import INCEPTION_FILE, save_random_inception_weights
    from tokenizer import PaletteTokenizer

    torch.manual_seed(0)
    config = GPTConfig(size=None, n_layer=2, n_head=2, dim=64, vocab_size=len(COLORS), num_classes=3, grid_size=8,
                       registers=RegisterConfig(mode="ntp"))  # fmt: skip
    model = GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    model.save_pretrained(tmp_path / "export")
    PaletteTokenizer(COLORS).save(tmp_path / "palette.json")
    weights = save_random_inception_weights(tmp_path / INCEPTION_FILE)
    make_image_folder(tmp_path / "reference", classes=3, per_class=4)
    results = fid_cli.run([
        "--ckpt", str(tmp_path / "export"), "--vq-ckpt", str(tmp_path / "palette.json"), "--tokenizer", "palette",
        "--num-samples", "24", "--batch-size", "8", "--ref-folder", str(tmp_path / "reference"),
        "--ref-cache", str(tmp_path / "cache"), "--inception-weights", str(weights), "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert results["precision"] == "bf16" and results["written_this_run"] == 24
    assert all(np.isfinite(v) for v in results["metrics"].values())
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 24


class ConvFeatures(torch.nn.Module):
    """A small stand-in extractor with Inception's interface: uint8 (B, 3, H, W) -> (pool, logits), on cuDNN."""

    name = "conv-features"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 5)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.conv(images.float() / 255).mean(dim=(2, 3))
        return pool, self.head(pool)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "cuda_graph"])
def test_eval_overlap_on_cuda_writes_and_measures_what_the_serial_order_does(tmp_path, compile):
    # Batch i decoded and measured on a second stream while batch i + 1 samples on a high-priority
    # one: the same kernels on the same inputs as the serial order (everything on the current
    # stream), so the same PNG bytes and bit-identical features; compiled, the captured decode step
    # replays on the sampling stream.
    from mutor_vision.evaluation import EvalConfig
    from mutor_vision.evaluation.run import sample_and_measure
    from mutor_vision.evaluation.timing import Timings
    from tokenizer import VQ16, VQ16Config, uint8_decoder

    model = small_model(registers=None).eval()
    torch.manual_seed(0)
    vq = VQ16(VQ16Config(codebook_size=1024, channels=32, channel_mult=(1, 2), z_channels=32, num_res_blocks=1))
    decode = uint8_decoder(vq.cuda().eval())
    outputs = {}
    for overlap in (False, True):
        timings = Timings("cuda")
        config = EvalConfig(
            tmp_path / str(overlap), sampling=SamplingConfig(cfg_scale=2.0), batch_size=4, feature_batch_size=3,
            compile=compile, overlap=overlap,
        )  # fmt: skip
        outputs[overlap] = sample_and_measure(
            model, decode, ConvFeatures(), np.arange(10) % 10, range(10), config, False, timings
        ).features
        summary = timings.summary()
        assert summary["parts"]["decode"]["batches"] == 3 and summary["parts"]["decode"]["gpu_s"] > 0
        assert 0 <= summary["gpu_timeline"]["both_s"] <= summary["gpu_timeline"]["sampling_s"]
    model.clear_caches()
    assert all(np.array_equal(a, b) for a, b in zip(outputs[False], outputs[True], strict=True))
    for i in range(10):
        name = f"samples/{i:06d}.png"
        assert (tmp_path / "False" / name).read_bytes() == (tmp_path / "True" / name).read_bytes(), name


def test_text_fsdp2_one_process_saves_resumes_and_exports(tmp_path):
    # Full fine-tuning under FSDP2 (configs/accelerate/fsdp2_text.yaml), sharded by the model's own
    # decoder-layer class; accelerate runs FSDP on CUDA only, so this lives in the GPU tier.
    from test_text import CORPUS
    from transformers import AutoModelForCausalLM

    from mutor_vision.text.data import word_tokenizer
    from mutor_vision.text.tiny import tiny_causal_lm

    tokenizer = word_tokenizer(CORPUS)
    tiny_causal_lm(len(tokenizer), "llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"question": t.split(" Answer: ")[0], "answer": t.split(" Answer: ")[1]} for t in CORPUS * 5]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--config", str(ROOT / "configs" / "text" / "gsm8k_mutor.yaml"), f"model.name_or_path={tmp_path / 'model'}"]
    args += ["data.hf_name=null", f"data.jsonl={tmp_path / 'train.jsonl'}", f"out_dir={tmp_path / 'run'}"]
    args += ["global_batch_size=4", "micro_batch_size=2", "save_every=2", "tensorboard=false", "data.max_length=64"]
    resumed = launch_then_resume("fsdp2_text.yaml", "train_sft.py", args, ("epochs", 1, 2))
    assert "resumed from" in resumed, resumed[-4000:]
    export = tmp_path / "run" / "checkpoints" / "step_00000010" / "export"
    assert AutoModelForCausalLM.from_pretrained(export / "model") is not None
    assert (export / "registers.safetensors").is_file()
