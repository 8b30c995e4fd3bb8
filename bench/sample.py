"""Sampling throughput: KV cache vs full recompute, CFG on/off, compile on/off; and the whole
evaluation pipeline (sampling + tokenizer decode + Inception features) in images/s.

    python bench/sample.py --out bench/results/sample_cpu_tiny.json                      # tiny model
    python bench/sample.py --size GPT-B --batch-size 2 --no-cache-tokens 32 --pipeline \\
        --out bench/results/sample_cpu_gpt_b.json
    python bench/sample.py --size GPT-B --dtype bf16 --batch-size 64 --variants cache_cfg --compile \\
        --math-attention --profile                                                   # on a GPU

Timings are medians of interleaved repeats in one process. The no-cache path recomputes the
whole prefix for every token; at GPT-B it is timed over the first --no-cache-tokens tokens only
(and the cached path over the same tokens for the ratio), since the full 256 would take minutes
on a CPU. Models and tokenizers have random weights: speed only, no quality.

``--math-attention`` adds the compiled variant with the decode's attention restricted to SDPA's
math backend (which inductor turns into its own fused kernels, as LlamaGen's sampling does) for an
A/B against the default backends. ``--profile`` records one compiled run with torch.profiler: GPU
kernel time per decode step against the wall time per step (a ratio well below 1 means the step is
bound by launches and host work, not by the GPU) and the kernels that take the most time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch
from common import median_time, provenance, save  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, generate


def build(args: argparse.Namespace, grid: int) -> GPT:
    torch.manual_seed(0)
    if args.size:
        config = GPTConfig(size=args.size, grid_size=grid, registers=RegisterConfig(mode="ntp"))
    else:
        config = GPTConfig(
            size=None, n_layer=2, n_head=2, dim=64, vocab_size=64, num_classes=10, grid_size=grid,
            registers=RegisterConfig(mode="ntp"),
        )  # fmt: skip
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None)
    parser.add_argument("--grid-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="cache_cfg,cache_nocfg,nocache_cfg,nocache_nocfg")
    parser.add_argument("--no-cache-tokens", type=int, default=0, help="time the paths on this prefix (0: all)")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights (bf16: GPU)")
    parser.add_argument("--math-attention", action="store_true", help="also time compiled with math-backend attention")
    parser.add_argument("--profile", action="store_true", help="profile one compiled run (GPU time per step)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = args.grid_size
    tokens = args.no_cache_tokens or grid * grid
    # The ratio is measured on a prefix: a model whose grid holds exactly `tokens` tokens would
    # change the table; instead sample on a grid sized to the prefix when it is a square.
    prefix_grid = math.isqrt(tokens)
    if prefix_grid * prefix_grid != tokens:
        raise SystemExit("--no-cache-tokens must be a square number (a grid side squared)")
    model = build(args, prefix_grid).to(device)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # RoPE stays fp32
    labels = torch.arange(args.batch_size, device=device) % model.config.num_classes

    def run(**kwargs):
        return lambda: generate(model, labels, seed=0, **kwargs)

    rows = {}
    variants = {
        "cache_cfg": dict(cfg_scale=2.0),
        "cache_nocfg": dict(cfg_scale=1.0),
        "nocache_cfg": dict(cfg_scale=2.0, use_cache=False),
        "nocache_nocfg": dict(cfg_scale=1.0, use_cache=False),
    }
    variants = {name: kwargs for name, kwargs in variants.items() if name in args.variants.split(",")}
    if args.compile:
        variants["cache_cfg_compiled"] = dict(cfg_scale=2.0, compile=True)
        if args.math_attention:
            variants["cache_cfg_compiled_math"] = dict(cfg_scale=2.0, compile=True)
    profile = None
    for name, kwargs in variants.items():
        # Compiled: the first call compiles, the second records the CUDA graphs; replays follow.
        warmup = args.warmup if "compiled" not in name else max(2, args.warmup)
        with math_attention(name.endswith("_math")):
            seconds = median_time(run(**kwargs), args.repeats, warmup)
            if args.profile and name == "cache_cfg_compiled" and device.type == "cuda":
                profile = profile_run(run(**kwargs), tokens)
        rows[name] = {
            "seconds": seconds,
            "tokens_per_s": args.batch_size * tokens / seconds,
            "images_per_s": args.batch_size / seconds * (tokens / (grid * grid)),
        }
    pairs = {
        "cache_over_nocache_cfg": ("nocache_cfg", "cache_cfg"),
        "cache_over_nocache_nocfg": ("nocache_nocfg", "cache_nocfg"),
        "cfg_cost": ("cache_cfg", "cache_nocfg"),
        "graph_over_eager_cfg": ("cache_cfg", "cache_cfg_compiled"),
        "math_over_default_compiled": ("cache_cfg_compiled", "cache_cfg_compiled_math"),
    }
    ratios = {k: rows[a]["seconds"] / rows[b]["seconds"] for k, (a, b) in pairs.items() if a in rows and b in rows}
    result = {
        **provenance("sample", device),
        "config": vars(args),
        "timed_tokens": tokens,
        "rows": rows,
        "ratios": ratios,
    }
    if profile is not None:
        result["profile_compiled"] = profile
        print(f"profile: {json.dumps({k: v for k, v in profile.items() if k != 'top_kernels'})}")
    for name, row in rows.items():
        print(f"{name:<20} {row['seconds']:8.3f} s  {row['tokens_per_s']:9.1f} tok/s  {row['images_per_s']:7.3f} img/s")
    for name, value in ratios.items():
        print(f"{name:<26} {value:6.2f}x")
    save(args.out, result)


@contextlib.contextmanager
def math_attention(enabled: bool):
    """Within: the model's masked attention (the decode's) runs SDPA's math backend only."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mutor_vision.models import gpt

    original = gpt._masked_sdpa

    def math_sdpa(q, k, v, mask):
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    gpt._masked_sdpa = math_sdpa
    try:
        yield
    finally:
        gpt._masked_sdpa = original


def profile_run(fn, steps: int) -> dict:
    """GPU kernel time of one ``fn()`` against its wall time, per decode step, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: the CUDA graphs exist before recording
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.device_time)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:12]
    return {
        "wall_s": wall,
        "wall_ms_per_step": wall * 1e3 / steps,
        "gpu_ms_per_step": gpu_us / 1e3 / steps,
        "gpu_busy_fraction": gpu_us / 1e6 / wall,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels": [{"name": n[:120], "count": len(t), "total_ms": sum(t) / 1e3} for n, t in top],
    }


if __name__ == "__main__":
    main()
