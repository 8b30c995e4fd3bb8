"""Training-step time of MuToR (2D, 1D) against next-token at the same batch, as ratios.

    python bench/train_step.py                       # small CPU config, fp32
    python bench/train_step.py --size GPT-B --batch-size 2 --repeats 5
    python bench/train_step.py --n-layer 2 --dim 64 --vocab-size 16 --grid-size 8 --variants ntp,mutor2d:20
    python bench/train_step.py --device cuda --dtype bf16 --size GPT-B --batch-size 64 --attention flex
    python bench/train_step.py --device cuda --dtype bf16 --size GPT-B --batch-size 128 \
        --variants ntp,mutor2d:80+flex,mutor2d:80+sdpa,ntp+chunk8192,mutor2d:80+flex+chunk8192

Each step is the trainer's on one batch: register layout and mask, forward + backward, the loss
parts and the clipped grad norm read on the host, the trainer's AdamW (fused on CUDA). Variants
run interleaved (A B C A B C ...) after warm-up, and the median per variant is reported, so
machine noise hits all alike. ``--chain K`` times K steps back to back and reports the time per
step: the host work before a step's forward (its layout and mask) then overlaps the previous
step's update, as in training; the isolated step's median is kept as ``step_s_isolated``. A variant
may override the attention backend (``+flex``, ``+sdpa``) and the head chunk (``+chunkN``); its
ratio is against the next-token variant with the same head chunk (else the first variant). The
goal (docs/method.md §2): step(MuToR) / step(NTP) <= 1.05 × (N + R) / N.

On CUDA each variant also reports its peak memory during one step (above the step's start, and
in all) and, with ``--compile``, the graphs dynamo compiled at the first step and in all (a later
graph is a recompile) and its graph breaks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from common import profile_run, provenance, save, wall_time  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig
from mutor_vision.training.loop_config import OptimConfig
from mutor_vision.training.optim import build_optimizer


def variant(name: str) -> RegisterConfig:
    """``ntp``, or ``mutor2d:R`` / ``mutor1d:R`` with R registers per sample (``all`` = every slot)."""
    if name == "ntp":
        return RegisterConfig(mode="ntp")
    mode, _, count = name.partition(":")
    return RegisterConfig(mode=mode, num_registers=None if count in ("", "all") else int(count))


def parse_variant(spec: str, args: argparse.Namespace) -> tuple[RegisterConfig, str, int]:
    """``base[+flex|+sdpa|+auto][+chunkN]`` -> (registers, attention, head_chunk_size); unset parts from args."""
    base, *options = spec.split("+")
    attention, chunk = args.attention, args.head_chunk_size
    for option in options:
        if option in ("auto", "flex", "sdpa"):
            attention = option
        elif option.startswith("chunk") and option[5:].isdigit():
            chunk = int(option[5:])
        else:
            raise SystemExit(f"--variants: unknown option {option!r} in {spec!r} (flex, sdpa, auto or chunkN)")
    return variant(base), attention, chunk


def build(args: argparse.Namespace, registers: RegisterConfig, attention: str, chunk: int) -> GPTConfig:
    common = dict(registers=registers, attention=attention, head_chunk_size=chunk)
    if args.size:
        return GPTConfig(size=args.size, grid_size=args.grid_size, **common)
    return GPTConfig(
        size=None,
        n_layer=args.n_layer,
        n_head=max(1, args.dim // 64),
        dim=args.dim,
        vocab_size=args.vocab_size,
        grid_size=args.grid_size,
        **common,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="GPT-B / GPT-L / ... (default: the small config below)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--grid-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="ntp,mutor2d:80,mutor2d:all,mutor1d:80")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chain", type=int, default=1, help="time K steps back to back, per step (1: isolated)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--head-chunk-size", type=int, default=0, help="head + CE in chunks (0: whole logits)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--profile", action="store_true", help="CUDA: one profiled step per variant (GPU time, busy, top kernels)"
    )
    parser.add_argument("--out", default=None, help="write results JSON here (e.g. bench/results/x.json)")
    args = parser.parse_args()
    if args.chain < 1:
        parser.error(f"--chain must be >= 1, got {args.chain}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    names = args.variants.split(",")
    steps, preparing = {}, {}
    optim = OptimConfig()
    graphs: dict[str, list] = {name: [] for name in names}
    for name in names:
        registers, attention, chunk = parse_variant(name, args)
        torch.manual_seed(0)
        model = GPT(build(args, registers, attention, chunk)).to(device).train()
        optimizer = build_optimizer(model, optim)  # the trainer's: fused on CUDA, decay groups
        params = [p for p in model.parameters() if p.requires_grad]
        forward = torch.compile(model, backend=counting_backend(graphs[name])) if args.compile else model
        config = model.config
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, config.vocab_size, (args.batch_size, config.num_tokens), generator=g).to(device)
        labels = torch.randint(0, config.num_classes, (args.batch_size,), generator=g).to(device)

        def prepare(model=model, batch=tokens.shape[0], g=g):
            """The step's register layout and mask, built outside the compiled forward as the trainer does."""
            layout = model.register_layout(batch, generator=g, device=device)
            return layout, None if layout is None else model.attention_mask(layout)

        def step(forward=forward, optimizer=optimizer, params=params, tokens=tokens, labels=labels, prepare=prepare):
            layout, mask = prepare()
            with autocast:
                parts = forward(tokens, labels, layout, mask, return_loss=True).loss
            parts["loss"].backward()
            # What the trainer does between backward and update (mutor_vision/training/runtime.py
            # backward_and_step): read the loss parts, clip and read the grad norm (a non-finite one
            # refuses the update) — two waits for the GPU per step, paid by every variant alike.
            torch.stack([value.detach().float() for value in parts.values()]).tolist()
            float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = (step, model.config)
        preparing[name] = prepare

    # Warm-up one variant at a time, so compilation, graph breaks and memory are each its own.
    compiled: dict[str, dict] = {}
    memory: dict[str, dict] = {}
    for name in names:
        breaks_before = graph_breaks()
        first = wall_time(steps[name][0])
        compiled[name] = {"first_step_s": first, "graphs_at_first_step": len(graphs[name])}
        for _ in range(args.warmup - 1):
            wall_time(steps[name][0])
        compiled[name]["graph_breaks"] = graph_breaks() - breaks_before
        if device.type == "cuda":
            memory[name] = step_memory(steps[name][0])
    times: dict[str, list[float]] = {name: [] for name in names}
    isolated: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            step = steps[name][0]
            isolated[name].append(wall_time(step))
            if args.chain > 1:
                times[name].append(wall_time(lambda step=step: chained(step, args.chain)) / args.chain)
    if args.chain == 1:
        times = isolated

    # Where a step's time goes (CUDA): GPU kernel time against wall time and the top kernels, one step
    # per variant after the timed ones, so MuToR's extra cost over next-token can be read kernel by kernel.
    profiling = args.profile and device.type == "cuda"
    profiles = {}
    for name in names if profiling else ():
        profiles[name] = profile_run(lambda n=name: chained(steps[n][0], args.chain), args.chain)
    # The host's share of a step's preparation (layout, mask), not waiting for the GPU: it runs while the
    # previous step's update does, so only what exceeds that stays on the critical path.
    prep_ms = {name: 1e3 * statistics.median(host_time(preparing[name]) for _ in range(args.repeats)) for name in names}
    medians = {name: statistics.median(times[name]) for name in names}
    rows = []
    for name in names:
        config = steps[name][1]
        n = config.num_tokens
        r = 0 if not config.registers.enabled else (config.registers.num_registers or n)
        base = baseline(name, names, steps)
        ratio = medians[name] / medians[base]
        row = {
            "variant": name,
            "attention": config.attention,
            "head_chunk_size": config.head_chunk_size,
            "baseline": base,
            "tokens": n,
            "registers": r,
            "step_s": medians[name],
            "step_s_isolated": statistics.median(isolated[name]),
            "chain": args.chain,
            "images_per_s": args.batch_size / medians[name],
            "ratio": ratio,
            "ideal": (n + r) / n,
            "ratio_over_ideal": ratio / ((n + r) / n),
            "all_s": times[name],
            "prepare_host_ms": prep_ms[name],
            **memory.get(name, {}),
        }
        if name in profiles:
            row["profile"] = profiles[name]
        if args.compile:
            row.update(compiled[name], graphs=len(graphs[name]))
            row["recompiles"] = len(graphs[name]) - compiled[name]["graphs_at_first_step"]
        rows.append(row)
    header = f"{'variant':<26} {'R':>4} {'step s':>8} {'img/s':>8} {'ratio':>6} {'ideal':>6} {'ratio/ideal':>11}"
    print(header)
    for row in rows:
        print(
            f"{row['variant']:<26} {row['registers']:>4} {row['step_s']:>8.4f} {row['images_per_s']:>8.1f} "
            f"{row['ratio']:>6.3f} {row['ideal']:>6.3f} {row['ratio_over_ideal']:>11.3f}"
        )
    if args.out:
        result = {
            **provenance("train_step", device),
            "config": {k: v for k, v in vars(args).items() if k != "out" and not (args.size and k in SMALL_ONLY)},
            "model": model_summary(steps[names[0]][1]),
            "rows": rows,
        }
        save(args.out, result)


SMALL_ONLY = ("n_layer", "dim", "vocab_size")  # flags --size overrides: not recorded as if they applied


def model_summary(config: GPTConfig) -> dict:
    """The architecture that ran (what ``--size`` or the small-config flags resolved to)."""
    keys = ("size", "n_layer", "n_head", "dim", "ffn_hidden", "vocab_size", "grid_size", "num_tokens")
    return {key: getattr(config, key) for key in keys}


def host_time(fn) -> float:
    """Seconds the host spends in ``fn`` (no wait for the GPU before or after)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def chained(step, count: int) -> None:
    for _ in range(count):
        step()


def baseline(name: str, names: list[str], steps: dict) -> str:
    """The next-token variant with ``name``'s head chunk (else the first variant): its ratio's denominator."""
    chunk = steps[name][1].head_chunk_size
    for other in names:
        config = steps[other][1]
        if not config.registers.enabled and config.head_chunk_size == chunk:
            return other
    return names[0]


def counting_backend(graphs: list):
    """Inductor, recording each graph dynamo hands it: one per compile (the first, then recompiles)."""

    def backend(graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    return backend


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def step_memory(step) -> dict[str, float]:
    """Peak CUDA memory of one step: above its start (activations, logits) and in all, GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_above_start_gib": (peak - start) / 2**30, "peak_gib": peak / 2**30}


if __name__ == "__main__":
    main()
