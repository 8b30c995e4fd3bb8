"""Evaluation throughput: ``evaluate()`` end to end against raw sampling, images/s, in one process.

    python bench/eval_pipeline.py --out bench/results/eval_pipeline_cpu.json            # small model, CPU
    python bench/eval_pipeline.py --size GPT-B --tokenizer vq16 --batch-size 125 --num-samples 1000 \\
        --compile --out bench/results/eval_pipeline_h100.json                          # on a GPU

Raw sampling is ``generate`` alone over the same number of images at the same batch size; end to
end is the evaluation run of ``eval/fid.py`` (sampling, tokenizer decode, Inception features from
memory, PNG writing on background threads; no reference set, no npz). The row ``ratio`` is end to
end / raw sampling (ideal 1.0; the goal is >= 0.8). Random weights everywhere (GPT, VQ-16,
Inception): speed only, never quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mutor_vision.evaluation import INCEPTION_FILE, evaluate, inception_extractor, save_random_inception_weights  # noqa: E402
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate  # noqa: E402
from tokenizer import VQ16, PaletteTokenizer, to_uint8  # noqa: E402


def build_model(size: str | None, grid: int) -> GPT:
    torch.manual_seed(0)
    if size:
        config = GPTConfig(size=size, grid_size=grid, registers=RegisterConfig(mode="ntp"))
    else:  # a small model: 4 layers, 256 wide, the VQ-16 vocabulary
        registers = RegisterConfig(mode="ntp")
        config = GPTConfig(size=None, n_layer=4, n_head=4, dim=256, grid_size=grid, registers=registers)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model


def build_decode(kind: str, vocab: int, device: torch.device):
    if kind == "vq16":
        vq = VQ16().to(device).eval()  # random weights, LlamaGen's architecture
        return lambda codes: to_uint8(vq.decode(codes).float())
    colors = torch.randint(0, 256, (vocab, 3), generator=torch.Generator().manual_seed(0)).numpy()
    palette = PaletteTokenizer(colors.astype("uint8"))
    return lambda codes: to_uint8(palette.decode(codes.cpu())).to(codes.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="GPT-B, GPT-L, ... (default: a small 4-layer model)")
    parser.add_argument("--grid-size", type=int, default=16)
    parser.add_argument("--tokenizer", choices=["vq16", "palette"], default="palette")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="the CUDA-graph decode step (CUDA only)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.size, args.grid_size).to(device)
    if (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16":
        model = model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    decode = build_decode(args.tokenizer, model.config.vocab_size, device)
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    starts = range(0, args.num_samples, args.batch_size)
    batches = [torch.arange(s, min(args.num_samples, s + args.batch_size)) for s in starts]
    generate(model, (batches[0] % model.config.num_classes).to(device), sampling, compile=args.compile)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for labels in batches:
        generate(model, (labels % model.config.num_classes).to(device), sampling, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    raw_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        extractor = inception_extractor(save_random_inception_weights(Path(tmp) / INCEPTION_FILE))
        start = time.perf_counter()
        results = evaluate(
            model, decode, extractor, None, Path(tmp) / "out", num_samples=args.num_samples, sampling=sampling,
            batch_size=args.batch_size, feature_batch_size=args.batch_size, save_npz=False, compile=args.compile,
        )  # fmt: skip
        total_s = time.perf_counter() - start
    pipeline_s = results["sample_and_measure_seconds_this_run"]
    rows = {
        "raw_sampling": {"seconds": raw_s, "images_per_s": args.num_samples / raw_s},
        "end_to_end": {"seconds": pipeline_s, "images_per_s": args.num_samples / pipeline_s},
        "end_to_end_with_metrics": {"seconds": total_s, "images_per_s": args.num_samples / total_s},
    }
    report = {
        **provenance("eval_pipeline", device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "ratio": rows["end_to_end"]["images_per_s"] / rows["raw_sampling"]["images_per_s"],
        "ideal": 1.0,
    }
    for name, row in rows.items():
        print(f"{name:<26} {row['seconds']:8.2f} s  {row['images_per_s']:8.2f} img/s")
    print(f"ratio (end to end / raw sampling) {report['ratio']:.3f}  (ideal 1.0, goal >= 0.8)")
    save(args.out, report)


if __name__ == "__main__":
    main()
