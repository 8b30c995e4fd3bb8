"""Whole logits against the chunked head + CE (``model.head_chunk_size``): step time and peak memory.

    python bench/head_loss.py                                     # GPT-B, batch 4, R = 80, CPU fp32
    python bench/head_loss.py --chunks 0,2048,8192 --batch-size 8 --out bench/results/head_loss_cpu.json
    python bench/head_loss.py --device cuda --dtype bf16 --batch-size 128 --compile \\
        --out bench/results/head_loss_h100.json

A step is forward + backward + AdamW of the full model on one batch. Times: the chunk sizes run
interleaved in one process after warm-up (medians). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during one step, above the allocation at its start; on CPU
each chunk size runs one warm-up and one step in a fresh process, whose peak resident set (VmHWM)
is reported (the whole process: weights, AdamW state and activations included, so the difference
between rows is what the logits cost).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from common import provenance, save, wall_time  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig


def make_step(args: argparse.Namespace, chunk: int, device: torch.device):
    registers = RegisterConfig(mode="mutor2d", num_registers=args.registers) if args.registers else RegisterConfig()
    torch.manual_seed(0)
    model = GPT(GPTConfig(size=args.size, registers=registers, head_chunk_size=chunk)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    g = torch.Generator().manual_seed(0)
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, config.num_tokens), generator=g).to(device)
    labels = torch.randint(0, config.num_classes, (args.batch_size,), generator=g).to(device)

    def step() -> float:
        layout = model.register_layout(args.batch_size, generator=g, device=device)
        mask = None if layout is None else model.attention_mask(layout)
        with autocast:
            loss = forward(tokens, labels, layout, mask, return_loss=True).loss["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peak_bytes(args: argparse.Namespace, chunk: int, device: torch.device) -> int:
    if device.type == "cuda":
        # Above the step's start (weights and AdamW state): what another row's leftovers cannot skew.
        step = make_step(args, chunk, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - start
    # CPU: a fresh process per chunk size, so one row's peak does not hide another's
    command = [sys.executable, __file__, "--worker-peak", str(chunk), *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (Linux), which belongs to the process's own memory map.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's peak over fork + exec into it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak CPU memory is measured on Linux only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="GPT-B")
    parser.add_argument("--registers", type=int, default=80, help="MuToR-2D registers per image (0: next-token)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chunks", default="0,2048,8192", help="head_chunk_size values; 0 = whole logits")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--worker-peak", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.worker_peak is not None:  # the CPU peak-memory child: warm up, one step, report
        step = make_step(args, args.worker_peak, device)
        step()
        step()
        print(peak_rss_bytes())
        return

    cuda = device.type == "cuda"
    chunks = [int(c) for c in args.chunks.split(",")]
    peaks = {chunk: peak_bytes(args, chunk, device) for chunk in chunks}
    steps = {chunk: make_step(args, chunk, device) for chunk in chunks}
    losses = {chunk: steps[chunk]() for chunk in chunks}  # the same first batch: the same loss
    for _ in range(args.warmup):
        for chunk in chunks:
            wall_time(steps[chunk])
    times: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for _ in range(args.repeats):
        for chunk in chunks:
            times[chunk].append(wall_time(steps[chunk]))

    base_time, base_peak = statistics.median(times[chunks[0]]), peaks[chunks[0]]
    rows = []
    print(f"{'chunk':>6} {'step s':>8} {'time ratio':>10} {'peak GiB':>9} {'peak ratio':>10} {'first loss':>11}")
    for chunk in chunks:
        median = statistics.median(times[chunk])
        row = {
            "head_chunk_size": chunk,
            "step_s": median,
            "time_ratio": median / base_time,
            "peak_bytes": peaks[chunk],
            "peak_ratio": peaks[chunk] / base_peak,
            "first_loss": losses[chunk],
            "all_s": times[chunk],
        }
        rows.append(row)
        print(
            f"{chunk:>6} {median:>8.3f} {row['time_ratio']:>10.3f} {peaks[chunk] / 2**30:>9.2f} "
            f"{row['peak_ratio']:>10.3f} {losses[chunk]:>11.5f}"
        )
    positions = args.batch_size * (GPTConfig(size=args.size).num_tokens + args.registers)
    logits_gib = positions * GPTConfig(size=args.size).vocab_size * 4 / 2**30
    print(f"one float32 copy of the whole logits: {logits_gib:.2f} GiB ({positions} positions)")
    save(
        args.out,
        {
            **provenance("head_loss", device),
            "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker_peak")},
            "peak_memory": "CUDA allocator peak above the step's start" if cuda else "process peak RSS (VmHWM)",
            "float32_logits_gib": logits_gib,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
