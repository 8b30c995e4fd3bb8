"""Training-step time of MuToR (2D, 1D) against next-token at the same batch, as ratios.

    python bench/train_step.py                       # small CPU config, fp32
    python bench/train_step.py --size GPT-B --batch-size 2 --repeats 5
    python bench/train_step.py --n-layer 2 --dim 64 --vocab-size 16 --grid-size 8 --variants ntp,mutor2d:20
    python bench/train_step.py --device cuda --dtype bf16 --size GPT-B --batch-size 64 --attention flex

Each step is forward + backward + AdamW on one batch. Variants run interleaved (A B C A B C ...)
after warm-up, and the median per variant is reported, so machine noise hits all alike. The goal
(docs/method.md §2): step(MuToR) / step(NTP) <= 1.05 × (N + R) / N.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
from common import provenance, save, wall_time  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig


def variant(name: str) -> RegisterConfig:
    """``ntp``, or ``mutor2d:R`` / ``mutor1d:R`` with R registers per sample (``all`` = every slot)."""
    if name == "ntp":
        return RegisterConfig(mode="ntp")
    mode, _, count = name.partition(":")
    return RegisterConfig(mode=mode, num_registers=None if count in ("", "all") else int(count))


def build(args: argparse.Namespace, registers: RegisterConfig) -> GPTConfig:
    common = dict(registers=registers, attention=args.attention, head_chunk_size=args.head_chunk_size)
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--head-chunk-size", type=int, default=0, help="head + CE in chunks (0: whole logits)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default=None, help="write results JSON here (e.g. bench/results/x.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    names = args.variants.split(",")
    steps = {}
    for name in names:
        torch.manual_seed(0)
        model = GPT(build(args, variant(name))).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        forward = torch.compile(model) if args.compile else model
        config = model.config
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, config.vocab_size, (args.batch_size, config.num_tokens), generator=g).to(device)
        labels = torch.randint(0, config.num_classes, (args.batch_size,), generator=g).to(device)

        def step(model=model, forward=forward, optimizer=optimizer, tokens=tokens, labels=labels, g=g) -> None:
            layout = model.register_layout(tokens.shape[0], generator=g, device=device)
            mask = None if layout is None else model.attention_mask(layout)  # outside the compiled forward
            with autocast:
                loss = forward(tokens, labels, layout, mask, return_loss=True).loss.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = (step, model.config)

    for _ in range(args.warmup):
        for name in names:
            wall_time(steps[name][0])
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(wall_time(steps[name][0]))

    base = statistics.median(times[names[0]])
    rows = []
    for name in names:
        config = steps[name][1]
        n = config.num_tokens
        r = 0 if not config.registers.enabled else (config.registers.num_registers or n)
        median = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "tokens": n,
                "registers": r,
                "step_s": median,
                "images_per_s": args.batch_size / median,
                "ratio": median / base,
                "ideal": (n + r) / n,
                "ratio_over_ideal": median / base / ((n + r) / n),
                "all_s": times[name],
            }
        )
    header = f"{'variant':<14} {'R':>4} {'step s':>8} {'img/s':>8} {'ratio':>6} {'ideal':>6} {'ratio/ideal':>11}"
    print(header)
    for row in rows:
        print(
            f"{row['variant']:<14} {row['registers']:>4} {row['step_s']:>8.4f} {row['images_per_s']:>8.1f} "
            f"{row['ratio']:>6.3f} {row['ideal']:>6.3f} {row['ratio_over_ideal']:>11.3f}"
        )
    if args.out:
        result = {
            **provenance("train_step", device),
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
        }
        if args.compile:
            from torch._dynamo.utils import counters

            result["dynamo"] = {
                "graph_breaks": dict(counters["graph_break"]),
                "unique_graphs": counters["stats"]["unique_graphs"],
            }
        save(args.out, result)


if __name__ == "__main__":
    main()
