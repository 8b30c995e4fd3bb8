"""Evaluation throughput: ``evaluate()`` end to end against raw sampling, and where the rest goes.

    python bench/eval_pipeline.py --out bench/results/eval_pipeline_cpu.json            # small model, CPU
    python bench/eval_pipeline.py --size GPT-B --tokenizer vq16 --batch-size 125 --num-samples 1000 \\
        --serial-samples 500 --compile --out bench/results/eval_pipeline_h100.json     # on a GPU

Raw sampling is ``generate`` alone over the same number of images at the same batch size; end to
end is the evaluation run of ``eval/fid.py`` (sampling, tokenizer decode, Inception features from
memory, PNG writing on background threads; no reference set, no npz), overlapped on CUDA (batch i
decoded and measured on a second stream while batch i + 1 samples); ``end_to_end_serial`` is the
same run in the serial order (``--serial-samples`` of them: its per-batch GPU times are each part's
cost alone). Both run after one untimed decode + features batch (``warm_up``: cuDNN and kernel
loading, the allocator's first blocks — once per process, which a 50,000-sample run amortises).
The row ``ratio`` is end to end / raw sampling (ideal 1.0; the goal is >= 0.8).

Each run's ``breakdown`` (:mod:`mutor_vision.evaluation.timing`): per part (``sample``, ``decode``,
``features``, ``copy``) its host wall time and, on CUDA, its GPU time per batch from CUDA events;
the host's waits (``results``: a batch's images and features; ``png_queue``: the PNG writer full;
``png_drain``: the last PNGs); on CUDA the GPU timeline (sampling alone, measuring alone, both at
once, idle). ``decode_variants`` (CUDA, VQ-16): the decoder's GPU time per batch in fp32 (the
default, cuDNN TF32), with channels_last, in bf16, and the pixels each changes against the default
(and strict fp32, TF32 off, on a slice). ``png``: one thread's ms per PNG and the writer's images/s.
Random weights everywhere (GPT, VQ-16, Inception): speed only, never quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)
from decode_precision import pixel_changes  # bench/decode_precision.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mutor_vision.evaluation import (  # noqa: E402
    INCEPTION_FILE,
    EvalConfig,
    Scoring,
    evaluate,
    inception_extractor,
    save_random_inception_weights,
)
from mutor_vision.evaluation import run as evaluation_run  # noqa: E402
from mutor_vision.evaluation.features import features_on_device  # noqa: E402
from mutor_vision.evaluation.samples import PngWriter, write_png  # noqa: E402
from mutor_vision.evaluation.timing import Timings  # noqa: E402
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate  # noqa: E402
from tokenizer import VQ16, PaletteTokenizer, to_uint8, uint8_decoder  # noqa: E402
from tokenizer.vq16 import decoder_in  # noqa: E402


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


def build_tokenizer(kind: str, vocab: int, device: torch.device) -> VQ16 | PaletteTokenizer:
    if kind == "vq16":
        torch.manual_seed(0)
        return VQ16().to(device).eval()  # random weights, LlamaGen's architecture
    colors = torch.randint(0, 256, (vocab, 3), generator=torch.Generator().manual_seed(0)).numpy()
    return PaletteTokenizer(colors.astype("uint8"))


def cuda_ms(fn, device: torch.device) -> tuple[Any, float | None]:
    """``fn()`` and its GPU milliseconds on the current stream (None on the CPU: time it by wall)."""
    if device.type != "cuda":
        return fn(), None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end)


def raw_sampling(model, batches, sampling, compile: bool, device) -> dict[str, Any]:
    """``generate`` alone over the batches: wall seconds and, on CUDA, GPU milliseconds per batch."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    gpu_ms, start = [], time.perf_counter()
    for labels in batches:
        labels = (labels % model.config.num_classes).to(device)
        _, ms = cuda_ms(lambda labels=labels: generate(model, labels, sampling, compile=compile), device)
        gpu_ms.append(ms)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"seconds": seconds, "images_per_s": sum(len(b) for b in batches) / seconds}
    if device.type == "cuda":
        row |= {"gpu_s": sum(gpu_ms) / 1e3, "gpu_ms_per_batch": [round(ms, 3) for ms in gpu_ms]}
    return row


def warm_up(decode, extractor, codes: torch.Tensor, feature_batch_size: int, device) -> float:
    """One decode + features batch before the timed runs: the seconds its one-time costs take."""
    start = time.perf_counter()
    extractor.to(device).eval()
    with torch.no_grad():
        features_on_device(extractor, decode(codes), feature_batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def end_to_end(model, decode, extractor, folder: Path, num_samples: int, args, overlap: bool) -> dict[str, Any]:
    """One ``evaluate()`` run: its rows and its breakdown."""
    device = next(model.parameters()).device
    timings = Timings(device)
    start = time.perf_counter()
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    config = EvalConfig(
        folder, num_samples=num_samples, sampling=sampling, batch_size=args.batch_size,
        feature_batch_size=args.batch_size, save_npz=False, compile=args.compile,
        decode_precision=args.decode_precision, overlap=overlap,
    )  # fmt: skip
    results = evaluate(model, decode, Scoring(extractor), config, timings)
    total = time.perf_counter() - start
    seconds = results["sample_and_measure_seconds_this_run"]
    return {
        "row": {"seconds": seconds, "images_per_s": num_samples / seconds, "samples": num_samples},
        "with_metrics": {"seconds": total, "images_per_s": num_samples / total},
        "breakdown": timings.summary(),
    }


def decode_variants(vq: VQ16, codes: torch.Tensor, strict_images: int = 25) -> dict[str, Any]:
    """The decoder's GPU ms per batch in each variant, and the uint8 pixels it changes against the default."""
    default = uint8_decoder(vq)
    variants = {"fp32": default}
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        for layout, suffix in [(torch.contiguous_format, ""), (torch.channels_last, "_channels_last")]:
            if name + suffix != "fp32":
                decoder = decoder_in(vq, dtype, layout)
                variants[name + suffix] = lambda codes, decoder=decoder: to_uint8(decoder(codes).float())
    reference = default(codes)
    rows: dict[str, Any] = {}
    for name, decode in variants.items():
        decode(codes)  # warm-up: kernels, plans
        images, ms = cuda_ms(lambda decode=decode: decode(codes), codes.device)
        rows[name] = {"gpu_ms_per_batch": round(ms, 3), **pixel_changes(images, reference)}
        del images
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        strict = default(codes[:strict_images])  # true float32: how far TF32, the default, already is
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    rows["fp32_default_vs_strict_fp32"] = {"images": strict_images, **pixel_changes(reference[:strict_images], strict)}
    return rows


def png_rates(images: np.ndarray, folder: Path) -> dict[str, float]:
    """One thread's milliseconds per PNG, and the writer's images/s with its threads (the host's CPUs)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = min(16, len(images))
    start = time.perf_counter()
    for i in range(count):
        write_png(folder / f"one_{i}.png", images[i])
    one_ms = (time.perf_counter() - start) / count * 1e3
    start = time.perf_counter()
    with PngWriter(folder) as writer:
        writer.submit(range(len(images)), images)
    return {"one_thread_ms_per_png": one_ms, "writer_images_per_s": len(images) / (time.perf_counter() - start)}


def print_breakdown(name: str, breakdown: dict[str, Any]) -> None:
    print(f"  {name}: wall {breakdown['wall_s']:.2f} s")
    for part, entry in breakdown["parts"].items():
        gpu = f"  GPU {entry['gpu_s']:7.3f} s" if "gpu_s" in entry else ""
        print(f"    {part:<10} host {entry['wall_s']:7.3f} s{gpu}  ({entry['batches']} batches)")
    for wait, seconds in breakdown["waits_s"].items():
        print(f"    wait {wait:<10} {seconds:7.3f} s")
    if "gpu_timeline" in breakdown:
        line = ", ".join(f"{key[:-2]} {value:.3f} s" for key, value in breakdown["gpu_timeline"].items())
        print(f"    GPU timeline: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=None, help="GPT-B, GPT-L, ... (default: a small 4-layer model)")
    parser.add_argument("--grid-size", type=int, default=16)
    parser.add_argument("--tokenizer", choices=["vq16", "palette"], default="palette")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--serial-samples", type=int, default=None, help="the serial run's samples (default: all)")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="the CUDA-graph decode step (CUDA only)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--decode-precision", choices=["fp32", "bf16"], default="fp32", help="the VQ-16 decoder's")
    parser.add_argument(
        "--sampling-priority", choices=["high", "normal"], default="high", help="the overlapped sampling stream's"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluation_run.SAMPLING_PRIORITY = {"high": -1, "normal": 0}[args.sampling_priority]
    model = build_model(args.size, args.grid_size).to(device)
    if (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16":
        model = model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    tokenizer = build_tokenizer(args.tokenizer, model.config.vocab_size, device)
    decode = uint8_decoder(tokenizer, args.decode_precision)
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    starts = range(0, args.num_samples, args.batch_size)
    batches = [torch.arange(s, min(args.num_samples, s + args.batch_size)) for s in starts]
    first = (batches[0] % model.config.num_classes).to(device)
    graphs = args.compile and device.type == "cuda"  # as evaluate() decides: the CPU runs eager
    codes = generate(model, first, sampling, compile=graphs)  # warm-up (CUDA-graph capture)
    rows: dict[str, Any] = {"raw_sampling": raw_sampling(model, batches, sampling, graphs, device)}
    report: dict[str, Any] = {
        **provenance("eval_pipeline", device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        extractor = inception_extractor(save_random_inception_weights(Path(tmp) / INCEPTION_FILE))
        report["warm_up_s"] = warm_up(decode, extractor, codes, args.batch_size, device)
        overlapped = end_to_end(model, decode, extractor, Path(tmp) / "overlap", args.num_samples, args, None)
        serial_samples = args.serial_samples or args.num_samples
        serial = end_to_end(model, decode, extractor, Path(tmp) / "serial", serial_samples, args, False)
        rows["end_to_end"] = overlapped["row"]
        rows["end_to_end_with_metrics"] = overlapped["with_metrics"]
        rows["end_to_end_serial"] = serial["row"]
        report["breakdown"] = {"end_to_end": overlapped["breakdown"], "end_to_end_serial": serial["breakdown"]}
        images = decode(codes).permute(0, 2, 3, 1).cpu().numpy()
        report["png"] = png_rates(images, Path(tmp) / "png")
    if device.type == "cuda" and isinstance(tokenizer, VQ16):
        report["decode_variants"] = decode_variants(tokenizer, codes)
    raw = rows["raw_sampling"]["images_per_s"]
    report |= {
        "rows": rows,
        "ratio": rows["end_to_end"]["images_per_s"] / raw,
        "ratio_serial": rows["end_to_end_serial"]["images_per_s"] / raw,
        "ideal": 1.0,
    }
    for name, row in rows.items():
        print(f"{name:<26} {row['seconds']:8.2f} s  {row['images_per_s']:8.2f} img/s")
    print(f"ratio (end to end / raw sampling) {report['ratio']:.3f}  (ideal 1.0, goal >= 0.8); "
          f"serial {report['ratio_serial']:.3f}; warm-up {report['warm_up_s']:.2f} s")  # fmt: skip
    for name, breakdown in report["breakdown"].items():
        print_breakdown(name, breakdown)
    print(f"  png: {report['png']['one_thread_ms_per_png']:.2f} ms per PNG on one thread, "
          f"the writer {report['png']['writer_images_per_s']:.0f} images/s")  # fmt: skip
    for name, row in report.get("decode_variants", {}).items():
        print(f"  decode {name}: {row}")
    save(args.out, report)


if __name__ == "__main__":
    main()
