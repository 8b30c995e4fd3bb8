"""Draw images of chosen classes from a trained model: one PNG per image and a labelled grid.

    python sample_c2i.py --ckpt runs/c2i/llamagen_b_mutor2d/checkpoints/step_00360000/export
    python sample_c2i.py --ckpt EXPORT --classes 207,360,387 --per-class 8 --cfg-scale 4 --out runs/samples/b
    python sample_c2i.py --ckpt c2i_B_256.pt --size GPT-B --trust-checkpoint --vq-ckpt vq_ds16_c2i.pt
    python sample_c2i.py --ckpt runs/demo/mutor2d-seed0/checkpoints/step_00000600/export --classes 0,3,7

The classes default to LlamaGen's demo list (207, 360, 387, 974, 88, 979, 417, 279) for a
1,000-class model, else the first eight; the sampling defaults are LlamaGen's sample_c2i.py's
(CFG 4.0, top-k 2000). Image i of the grid (row-major: a row per class) is drawn from the random
numbers of (seed, i), so the same command gives the same images whatever --batch-size is. Writes
<out>/NNNN_class<c>.png, <out>/grid.png (a row per class, labelled) and <out>/samples.json (the
checkpoint, the classes and every setting). The tokenizer is the one recorded in the export, or
--tokenizer-path.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eval.common import (
    add_model_args,
    add_sampling_args,
    check_inputs,
    fetch_checkpoint,
    input_problems,
    load_decoder,
    load_model,
    sampling_config,
)
from mutor_vision import __version__
from mutor_vision.cli import TOOL_EXIT_CODES, HelpFormatter, run_command, setup_logging
from mutor_vision.core.device import to_device
from mutor_vision.errors import ConfigError
from mutor_vision.evaluation.samples import save_labelled_grid, write_png
from mutor_vision.files import atomic_write_json
from mutor_vision.models import generate, generate_drafted, sample_uniforms
from mutor_vision.models.checkpoint import read_export_data
from mutor_vision.processes import use_cuda
from mutor_vision.seeds import hash_seed

log = logging.getLogger("sample_c2i")
LLAMAGEN_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # LlamaGen's sample_c2i.py


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample_c2i.py", description=__doc__, formatter_class=HelpFormatter, epilog=TOOL_EXIT_CODES
    )
    add_model_args(p)
    p.add_argument(
        "--classes",
        default=None,
        help="comma-separated class indices, a grid row each (default: LlamaGen's demo list for a 1,000-class "
        "model, else the first eight)",
    )
    p.add_argument("--per-class", type=int, default=4, help="images per class (a grid row)")
    add_sampling_args(p, cfg_scale=4.0, top_k=2000)
    p.add_argument("--batch-size", type=int, default=32, help="images sampled together")
    p.add_argument("--out", type=Path, default=Path("runs/samples"), help="the folder the images are written to")
    return p


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """The --classes list, each checked against the model's classes (a bad one: one line, exit 2)."""
    if text is None:
        default = LLAMAGEN_CLASSES if num_classes == 1000 else range(min(8, num_classes))
        return list(default)
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(item.lstrip("-").isdigit() for item in items):
        raise ConfigError(f"--classes {text!r}: not a comma-separated list of class indices (e.g. 207,360,387)")
    classes = [int(item) for item in items]
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ConfigError(f"--classes: {unknown[0]} is not a class of this model (classes 0..{num_classes - 1})")
    return classes


def row_label(label: int, names: list[str] | None) -> str:
    """A grid row's label: the class index, and its name when the export records one that says more."""
    name = str(names[label]) if names and label < len(names) else str(label)
    return str(label) if name == str(label) else f"{label} {name}"


def run(argv: list[str] | None = None) -> dict:
    """Sample per the command line; returns what samples.json records."""
    args = make_parser().parse_args(argv)
    if args.per_class < 1 or args.batch_size < 1:
        raise ConfigError(f"--per-class and --batch-size must be >= 1, got {args.per_class} and {args.batch_size}")
    sampling = sampling_config(args)
    fetch_checkpoint(args)
    check_inputs(input_problems(args))
    device = torch.device("cuda" if use_cuda(args.device) else "cpu")
    model, precision = load_model(args, device)
    classes = parse_classes(args.classes, model.config.num_classes)
    decode, _, tokenizer = load_decoder(args, device)
    names = read_export_data(args.ckpt).get("classes") if Path(args.ckpt).is_dir() else None
    labels = np.repeat(classes, args.per_class)
    compile = args.compile and device.type == "cuda"
    if args.compile and not compile:
        log.info("--compile: the CUDA-graph decode needs CUDA; sampling on the CPU runs eager")
    images = []
    starts = range(0, len(labels), args.batch_size)
    for start in tqdm(starts, unit="batch", desc="sampling", disable=len(starts) < 2):
        batch = list(range(start, min(len(labels), start + args.batch_size)))
        batch_labels = to_device(torch.as_tensor(labels[batch]), device)
        if args.draft_tokens > 1:  # drafting draws its own numbers: seeded by (seed, the batch's first index)
            drafting = sampling.replace(seed=hash_seed(sampling.seed, batch[0]))
            codes = generate_drafted(model, batch_labels, drafting, args.draft_tokens)
        else:
            uniform = sample_uniforms(sampling.seed, batch, model.config.num_tokens)
            codes = generate(model, batch_labels, sampling, uniform, compile=compile)
        with torch.no_grad():
            images.append(decode(codes).permute(0, 2, 3, 1).cpu().numpy())
    model.clear_caches()
    images = np.concatenate(images)
    args.out.mkdir(parents=True, exist_ok=True)
    files = [f"{i:04d}_class{c}.png" for i, c in enumerate(labels)]
    for name, image in zip(files, images, strict=True):
        write_png(args.out / name, image)
    row_labels = [
        str(c) if not names or c >= len(names) or str(names[c]) == str(c) else f"{c} {names[c]}" for c in classes
    ]
    save_labelled_grid(images, row_labels, args.per_class, args.out / "grid.png")
    record = {
        "package": {"name": "mutor-vision", "version": __version__},
        "checkpoint": str(args.ckpt),
        "classes": classes,
        "per_class": args.per_class,
        "sampling": {**dataclasses.asdict(sampling), "draft_tokens": args.draft_tokens},
        "precision": precision,
        "decode_precision": args.decode_precision,
        "compile": compile,
        "device": str(device),
        "tokenizer": tokenizer,
        "files": files,
        "grid": "grid.png",
    }
    atomic_write_json(args.out / "samples.json", record)
    log.info("%d images of %d classes: %s", len(files), len(classes), args.out / "grid.png")
    return record


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("sample_c2i.py", lambda: run(argv), interrupt_hint="run the same command again")


if __name__ == "__main__":
    sys.exit(main())
