"""Sampling throughput: KV cache vs full recompute, CFG on/off, compile on/off, and the compiled
decode under each decode attention (mutor_vision/models/decode.py), at one or more batch sizes.

    python bench/sample.py --out bench/results/sample_cpu_tiny.json                      # tiny model
    python bench/sample.py --size GPT-B --batch-size 2 --no-cache-tokens 64 \\
        --out bench/results/sample_cpu_gpt_b.json
    python bench/sample.py --size GPT-B --dtype bf16 --batch-size 32,64 --variants "" \\
        --decode-attention sdpa,flex,math@64,math+bucket64@64 --profile              # on a GPU
    python bench/sample.py --size GPT-B --dtype bf16 --batch-size 64 --variants "" \\
        --decode-attention flex --steps-per-graph 1,2,4 --profile                    # on a GPU

Timings are medians of repeats in one process. The no-cache path recomputes the whole prefix for
every token; at GPT-B it is timed over the first --no-cache-tokens tokens only (and the cached path
over the same tokens for the ratio), since the full 256 would take minutes on a CPU. Models and
tokenizers have random weights: speed only, no quality.

``--compile`` adds ``generate(compile=True)`` with its default decode attention (``auto``).
``--decode-attention`` adds the compiled decode with each named attention (``sdpa``, ``flex``,
``math``, ``math+bucket64``, ...: ``DecodeAttention.parse``), ``NAME@B`` only at batch size B; each
row then carries its speed-up over ``sdpa`` (the dense-mask decode, the default before
decode.py) at the same batch size. ``--steps-per-graph 1,2,4`` times each compiled variant with k
decode steps per CUDA graph (``generate(steps_per_graph=k)``), rows ``..._flex+steps4`` (k = 1 keeps
the plain name), each with its speed-up over the first k of the list (``speedup_over_steps1``);
``NAME+steps<k>`` in ``--decode-attention`` adds one such variant alone (``flex+steps4@64``).
``--profile`` records one run of every compiled variant at the
largest batch size with torch.profiler: GPU kernel time per decode step against the wall time per
step (a ratio well below 1 means the step is bound by launches and host work, not by the GPU) and
the kernels that take the most time. With several batch sizes, row and ratio names end in ``@B``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re

import torch
from common import median_time, profile_run, provenance, save  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, generate
from mutor_vision.models.decode import DecodeAttention

EAGER = {
    "cache_cfg": dict(cfg_scale=2.0),
    "cache_nocfg": dict(cfg_scale=1.0),
    "nocache_cfg": dict(cfg_scale=2.0, use_cache=False),
    "nocache_nocfg": dict(cfg_scale=1.0, use_cache=False),
}
PAIRS = {
    "cache_over_nocache_cfg": ("nocache_cfg", "cache_cfg"),
    "cache_over_nocache_nocfg": ("nocache_nocfg", "cache_nocfg"),
    "cfg_cost": ("cache_cfg", "cache_nocfg"),
    "graph_over_eager_cfg": ("cache_cfg", "cache_cfg_compiled"),
}


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


def steps_name(name: str, steps: int) -> str:
    """A compiled variant's row name with k steps per graph: ``+steps<k>``, none for k = 1."""
    return name if steps == 1 else f"{name}+steps{steps}"


def variants_at(args: argparse.Namespace, batch: int) -> dict[str, dict]:
    """The variants timed at ``batch``: name -> generate()'s keyword arguments."""
    variants = {name: kwargs for name, kwargs in EAGER.items() if name in args.variants.split(",")}
    all_steps = [int(k) for k in args.steps_per_graph.split(",")]
    if args.compile:
        for k in all_steps:
            variants[steps_name("cache_cfg_compiled", k)] = dict(cfg_scale=2.0, compile=True, steps_per_graph=k)
    for spec in filter(None, args.decode_attention.split(",")):
        spec, _, only = spec.partition("@")
        if not only or int(only) == batch:
            match = re.fullmatch(r"(.+?)(?:\+steps(\d+))?", spec)
            name, steps = match[1], [int(match[2])] if match[2] else all_steps
            attention = DecodeAttention.parse(name)  # a typo fails here, before any timing
            for k in steps:
                variants[steps_name(f"cache_cfg_compiled_{attention.name}", k)] = dict(
                    cfg_scale=2.0, compile=True, decode_attention=name, steps_per_graph=k
                )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None)
    parser.add_argument("--grid-size", type=int, default=16)
    parser.add_argument("--batch-size", default="8", help="one or more, comma-separated (one process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="cache_cfg,cache_nocfg,nocache_cfg,nocache_nocfg", help="eager ones")
    parser.add_argument("--no-cache-tokens", type=int, default=0, help="time the paths on this prefix (0: all)")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--decode-attention", default="", help="compiled with these decode attentions (NAME[@B],...)")
    parser.add_argument("--steps-per-graph", default="1", help="compiled: decode steps per CUDA graph (K,...)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights (bf16: GPU)")
    parser.add_argument("--profile", action="store_true", help="profile the compiled runs (GPU time per step)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in args.batch_size.split(",")]
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

    rows, ratios, profiles = {}, {}, {}
    for batch in batches:  # batch by batch: the variants at one batch share its KV cache
        labels = torch.arange(batch, device=device) % model.config.num_classes
        suffix = f"@{batch}" if len(batches) > 1 else ""
        timed, first_steps = {}, {}
        for name, kwargs in variants_at(args, batch).items():
            run = functools.partial(generate, model, labels, seed=0, **kwargs)
            # Compiled on CUDA: the first call compiles, the second records the CUDA graphs; replays follow.
            warmup = max(2, args.warmup) if "compiled" in name and device.type == "cuda" else args.warmup
            timed[name] = median_time(run, args.repeats, warmup)
            rows[name + suffix] = {
                "batch_size": batch,
                "seconds": timed[name],
                "tokens_per_s": batch * tokens / timed[name],
                "images_per_s": batch / timed[name] * (tokens / (grid * grid)),
            }
            baseline = timed.get("cache_cfg_compiled_sdpa")
            if name.startswith("cache_cfg_compiled_") and baseline is not None:
                rows[name + suffix]["speedup_over_sdpa"] = baseline / timed[name]
            if "steps_per_graph" in kwargs:  # against the same variant at the first k timed (k = 1 in 1,2,4)
                base = re.sub(r"\+steps\d+$", "", name)
                first, first_k = first_steps.setdefault(base, (name, kwargs["steps_per_graph"]))
                rows[name + suffix][f"speedup_over_steps{first_k}"] = timed[first] / timed[name]
            if args.profile and "compiled" in name and batch == max(batches) and device.type == "cuda":
                profiles[name] = profile_run(run, tokens)
                print(f"profile {name}: {json.dumps({k: v for k, v in profiles[name].items() if k != 'top_kernels'})}")
        for key, (slow, fast) in PAIRS.items():
            if slow in timed and fast in timed:
                ratios[key + suffix] = timed[slow] / timed[fast]
    result = {
        **provenance("sample", device),
        "config": vars(args),
        "timed_tokens": tokens,
        "rows": rows,
        "ratios": ratios,
    }
    if profiles:
        result["profile_compiled"] = profiles
    for name, row in rows.items():
        speedup = f"  {row['speedup_over_sdpa']:5.2f}x sdpa" if "speedup_over_sdpa" in row else ""
        speedup += "".join(f"  {v:5.2f}x {k[len('speedup_over_') :]}" for k, v in row.items() if "over_steps" in k)
        print(
            f"{name:<42} {row['seconds']:8.3f} s  {row['tokens_per_s']:9.1f} tok/s  {row['images_per_s']:7.3f} img/s"
            + speedup
        )
    for name, value in ratios.items():
        print(f"{name:<42} {value:6.2f}x")
    save(args.out, result)


if __name__ == "__main__":
    main()
