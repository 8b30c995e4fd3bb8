"""Sampling throughput: KV cache vs full recompute, CFG on/off, and the compiled decode (CUDA graphs,
flex decode attention), at one or more batch sizes.

    python bench/sample.py --out bench/results/sample_cpu_tiny.json                      # tiny model
    python bench/sample.py --size GPT-B --batch-size 2 --no-cache-tokens 64 \\
        --out bench/results/sample_cpu_gpt_b.json
    python bench/sample.py --size GPT-B --dtype bf16 --batch-size 32,64 --variants "" --compile \\
        --steps-per-graph 4@64 --profile                                                 # on a GPU

Timings are medians of repeats in one process. The no-cache path recomputes the whole prefix for
every token (``bench/decode_variants.py``); at GPT-B it is timed over the first --no-cache-tokens
tokens only (and the cached path over the same tokens for the ratio), since the full 256 would take
minutes on a CPU. Models and tokenizers have random weights: speed only, no quality.

``--compile`` adds ``generate(compile=True)``: rows ``cache_cfg_compiled``. On the CPU, where the
library samples eager (``eval/fid.py --compile`` is ignored there), those rows run eager too and
say so (``"compiled": false``). ``--steps-per-graph 4`` (``K[@B],...``) adds the compiled decode
with k decode steps per CUDA graph (``decode_variants.generate_in_groups``, not in the library until
an H100 measures it faster), rows ``cache_cfg_compiled+steps4``, each with its speed-up over the
one-step compiled decode at the same batch size (``speedup_over_steps1``). ``--profile`` records
one run of every compiled variant at the largest batch size with torch.profiler: GPU kernel time
per decode step against the wall time per step (a ratio well below 1 means the step is bound by
launches and host work, not by the GPU) and the kernels that take the most time. With several
batch sizes, row and ratio names end in ``@B``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
from common import median_time, profile_run, provenance, save  # bench/common.py (the script's folder is on sys.path)
from decode_variants import generate_in_groups, generate_without_cache  # bench/decode_variants.py

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate

EAGER = {
    "cache_cfg": (2.0, True),
    "cache_nocfg": (1.0, True),
    "nocache_cfg": (2.0, False),
    "nocache_nocfg": (1.0, False),
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


def steps_at(spec: str, batch: int) -> list[int]:
    """The k of ``--steps-per-graph`` (``K[@B],...``) that apply at ``batch``."""
    chosen = []
    for item in filter(None, spec.split(",")):
        k, _, only = item.partition("@")
        if not only or int(only) == batch:
            chosen.append(int(k))
    return chosen


def variants_at(args: argparse.Namespace, model: GPT, labels: torch.Tensor, graphs: bool) -> dict:
    """The variants timed at ``labels``' batch size: name -> a call that samples it."""
    variants = {}
    for name in filter(None, args.variants.split(",")):
        cfg, cached = EAGER[name]
        sampling = SamplingConfig(cfg_scale=cfg, seed=0)
        sample = generate if cached else generate_without_cache
        variants[name] = functools.partial(sample, model, labels, sampling)
    guided = SamplingConfig(cfg_scale=2.0, seed=0)
    if args.compile:
        variants["cache_cfg_compiled"] = functools.partial(generate, model, labels, guided, compile=graphs)
    for k in steps_at(args.steps_per_graph, labels.shape[0]):
        if k > 1:
            run = functools.partial(generate_in_groups, model, labels, guided, k, compile=graphs)
            variants[f"cache_cfg_compiled+steps{k}"] = run
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="GPT-B, GPT-L, ... (default: a tiny 2-layer model)")
    parser.add_argument("--grid-size", type=int, default=16, help="tokens per side (default: %(default)s)")
    parser.add_argument("--batch-size", default="8", help="one or more, comma-separated, one process (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(EAGER), help=f"eager ones, of {', '.join(EAGER)} (default: all)")
    parser.add_argument("--no-cache-tokens", type=int, default=0, help="time the paths on this prefix (0: all)")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--steps-per-graph", default="", help="compiled with k decode steps per graph (K[@B],...)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights (bf16: GPU)")
    parser.add_argument("--profile", action="store_true", help="profile the compiled runs (GPU time per step)")
    parser.add_argument("--out", default=None, help="the results JSON")
    args = parser.parse_args()
    unknown = set(filter(None, args.variants.split(","))) - set(EAGER)
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))} (known: {', '.join(EAGER)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs = device.type == "cuda"  # as the library's evaluation decides: the CPU samples eager
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
        timed = {}
        for name, run in variants_at(args, model, labels, graphs).items():
            compiled = "compiled" in name
            # Compiled on CUDA: the first call compiles, the second records the CUDA graphs; replays follow.
            warmup = max(2, args.warmup) if compiled and graphs else args.warmup
            timed[name] = median_time(run, args.repeats, warmup)
            rows[name + suffix] = {
                "batch_size": batch,
                "seconds": timed[name],
                "tokens_per_s": batch * tokens / timed[name],
                "images_per_s": batch / timed[name] * (tokens / (grid * grid)),
            }
            if compiled:
                rows[name + suffix]["compiled"] = graphs
            if "+steps" in name and "cache_cfg_compiled" in timed:
                rows[name + suffix]["speedup_over_steps1"] = timed["cache_cfg_compiled"] / timed[name]
            if args.profile and compiled and batch == max(batches) and graphs:
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
        speedup = f"  {row['speedup_over_steps1']:5.2f}x steps1" if "speedup_over_steps1" in row else ""
        print(
            f"{name:<42} {row['seconds']:8.3f} s  {row['tokens_per_s']:9.1f} tok/s  {row['images_per_s']:7.3f} img/s"
            + speedup
        )
    for name, value in ratios.items():
        print(f"{name:<42} {value:6.2f}x")
    save(args.out, result)


if __name__ == "__main__":
    main()
