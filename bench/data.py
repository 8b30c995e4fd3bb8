"""Data throughput: loader samples/s against what a training step consumes; encoding images/s.

    python bench/data.py --out bench/results/data_cpu.json

The loader reads synthetic token shards (16×16 grids, 2 crops, uint16) through the real
pipeline (resampled shards, shuffle buffer, random crop, batching, WebLoader workers). The
consumption side is measured in the same process: one GPT-B (or --size) fp32 training step at
--step-batch on this machine; the H100 figure uses the paper's reported 0.16 s/step at global
batch 1024 over 8 GPUs (128 samples per GPU per 0.16 s = 800 samples/s per rank).
Encoding: VQ-16 with random weights at 256 px and the palette tokenizer, images/s on this device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tokenizer/ lives at the repo root


from mutor_vision.data import token_loader
from mutor_vision.models import GPT, GPTConfig, RegisterConfig
from mutor_vision.shards import write_synthetic_shards

PAPER_H100_SAMPLES_PER_RANK = 1024 / 8 / 0.16


def loader_rate(root: Path, batch_size: int, workers: int, batches: int) -> float:
    loader = token_loader(root, batch_size, batches, seed=0, num_workers=workers, shuffle_buffer=1000)
    iterator = iter(loader)
    next(iterator)  # worker start-up and buffer fill are not throughput
    start = time.perf_counter()
    n = 0
    for tokens, _ in iterator:
        n += tokens.shape[0]
    return n / (time.perf_counter() - start)


def step_rate(size: str, batch_size: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = GPT(GPTConfig(size=size, registers=RegisterConfig(mode="mutor2d", num_registers=80))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 16384, (batch_size, 256))
    labels = torch.randint(0, 1000, (batch_size,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        layout = model.register_layout(batch_size)
        model(tokens, labels, layout, return_loss=True).loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def encode_rates(device: torch.device, images: int) -> dict[str, float]:
    from tokenizer import VQ16, PaletteTokenizer

    torch.manual_seed(0)
    vq = VQ16().to(device).eval()
    x = torch.rand(images, 3, 256, 256, device=device) * 2 - 1
    vq.encode(x[:1])
    start = time.perf_counter()
    vq.encode(x)
    vq_rate = images / (time.perf_counter() - start)
    palette = PaletteTokenizer(np.random.default_rng(0).integers(0, 255, (16, 3)).astype(np.uint8))
    start = time.perf_counter()
    palette.encode(x)
    return {"vq16_256px_images_per_s": vq_rate, "palette_256px_images_per_s": images / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--size", default="GPT-B")
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--encode-images", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_synthetic_shards(root, args.shards, args.per_shard, grid=16, vocab_size=16384, num_classes=1000)
        write_s = time.perf_counter() - start
        loader = loader_rate(root, args.batch_size, args.workers, args.batches)
    step = step_rate(args.size, args.step_batch, args.step_repeats)
    encode = encode_rates(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.encode_images)
    result = {
        **provenance("data"),
        "config": vars(args),
        "shard_write_samples_per_s": args.shards * args.per_shard / write_s,
        "loader_samples_per_s": loader,
        "train_step_samples_per_s": step,
        "ratio_vs_this_machine_step": loader / step,
        "paper_h100_samples_per_s_per_rank": PAPER_H100_SAMPLES_PER_RANK,
        "ratio_vs_paper_h100_rank": loader / PAPER_H100_SAMPLES_PER_RANK,
        **encode,
    }
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key:<36} {value:12.2f}")
    save(args.out, result)


if __name__ == "__main__":
    main()
