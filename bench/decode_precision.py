"""What ``eval/fid.py --decode-precision bf16`` does to the pixels: uint8 values changed against fp32.

    python bench/decode_precision.py --images 16 --out bench/results/decode_precision_cpu.json

LlamaGen's VQ-16 architecture with random weights (seed 0) decodes random codes (seed 0) in fp32
(the default, LlamaGen's protocol) and in bf16 (:func:`tokenizer.uint8_decoder`); the result counts
the uint8 values that differ, by how much, and the images with any change. On CUDA it adds true
float32 (TF32 off): how far the default, whose convolutions cuDNN runs in TF32, already is from it.
Random weights: trained ones give other images, so the numbers show the size of the effect, not
its exact value for LlamaGen's tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenizer import VQ16, uint8_decoder  # noqa: E402


def pixel_changes(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How many uint8 values of ``images`` differ from ``reference``, by how much, and in how many images."""
    diff = (images.int() - reference.int()).abs()
    counts = np.bincount(diff.flatten().cpu().numpy(), minlength=256)
    return {
        "values_changed": float((diff > 0).float().mean()),
        "values_off_by_more_than_1": float((diff > 1).float().mean()),
        "mean_abs_change": float(diff.float().mean()),
        "max_abs_change": int(diff.max()),
        "images_changed": float((diff.flatten(1).amax(1) > 0).float().mean()),
        "histogram": {str(k): int(counts[k]) for k in np.flatnonzero(counts)},  # |change| -> how many values
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vq = VQ16().to(device).eval()
    codes = torch.randint(0, vq.vocab_size, (args.images, 16, 16), generator=torch.Generator().manual_seed(0))
    variants = {"fp32": uint8_decoder(vq), "bf16": uint8_decoder(vq, "bf16")}
    outputs, seconds = {}, {}
    for name, decode in variants.items():
        start = time.perf_counter()
        outputs[name] = torch.cat([decode(part.to(device)).cpu() for part in codes.split(args.batch_size)])
        seconds[name] = time.perf_counter() - start
    rows = {"bf16": pixel_changes(outputs["bf16"], outputs["fp32"])}
    if device.type == "cuda":
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            strict = torch.cat([variants["fp32"](part.to(device)).cpu() for part in codes.split(args.batch_size)])
        finally:
            torch.backends.cudnn.allow_tf32 = saved
        rows["fp32_tf32_convolutions_vs_strict_fp32"] = pixel_changes(outputs["fp32"], strict)
        rows["bf16_vs_strict_fp32"] = pixel_changes(outputs["bf16"], strict)
    fp32 = outputs["fp32"].float()
    report = {
        **provenance("decode_precision", device),
        "config": {"images": args.images, "batch_size": args.batch_size, "weights": "random (seed 0)"},
        "fp32_pixels": {"mean": float(fp32.mean()), "std": float(fp32.std()), "clipped": float(
            ((outputs["fp32"] == 0) | (outputs["fp32"] == 255)).float().mean())},
        "seconds": seconds,
        "rows": rows,
    }  # fmt: skip
    for name, row in rows.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    save(args.out, report)


if __name__ == "__main__":
    main()
