"""One digits-demo run with given overrides: train (or reuse) it, evaluate its final checkpoint, record a row.

    python bench/demo_sweep.py --name base                    # the demo's ntp config (its steps, batch), seed 0
    python bench/demo_sweep.py --name lr6e-3 --set optim.lr=6e-3 --set optim.min_lr=6e-4
    python bench/demo_sweep.py --name b32 --steps 600 --set global_batch_size=32 --set micro_batch_size=32
    python bench/demo_sweep.py --name base --sampling 2,1,0 --sampling 4,0.8,4   # sampling only (run kept)
    python bench/demo_sweep.py --cache runs/demo-sweep-noshift --shifts 1 --name base   # no shifted copies

The hyper-parameter search of the embedded demo: it reuses demo/run_demo.py's pieces (the same data,
tokenizer, shards, trainer, classifier, evaluation and class consistency), prepares the data and
trains the classifier once into ``--cache``, and appends one row per (run, sampling setting) to
``--out``: the overrides, steps, the median step time, the training wall time (None when the run was
already trained), the consistency, FID, the sampling settings, and the likelihood accuracy (how much
the model uses the class, whatever its samples look like). ``--sampling`` is
``cfg_scale,temperature,top_k``; a finished run is kept, so a second call only samples.
Time it on idle cores only (``uptime`` load < 0.5), one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, provenance  # noqa: E402
from demo import run_demo  # noqa: E402
from demo.digits import SHIFTS, DigitsCNN, digits_extractor, load_digits_rgb, train_classifier  # noqa: E402
from mutor_vision.cli import setup_logging  # noqa: E402
from mutor_vision.config import load_yaml  # noqa: E402
from mutor_vision.evaluation import EvalConfig, Scoring, evaluate, reference_from_images  # noqa: E402
from mutor_vision.models import GPT, SamplingConfig  # noqa: E402
from mutor_vision.shards import read_manifest  # noqa: E402
from mutor_vision.training.c2i import train  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager  # noqa: E402
from mutor_vision.training.config import TrainConfig  # noqa: E402
from tokenizer import PaletteTokenizer, to_uint8  # noqa: E402


def cached_setup(cache: Path, shifts: int, colors: int):
    """The data (shards, palette) and the classifier, made once into ``cache``."""
    data = cache / "data"
    if not (data / "palette.json").is_file():
        run_demo.prepare_data(cache, shifts=SHIFTS[:shifts], num_colors=colors)
    train_x, train_y, _, _ = load_digits_rgb()
    weights = cache / "classifier.pt"
    if weights.is_file():
        classifier = DigitsCNN()
        classifier.load_state_dict(torch.load(weights))
        classifier.eval()
    else:
        classifier = train_classifier(train_x, train_y, epochs=15)
        torch.save(classifier.state_dict(), weights)
    extractor = digits_extractor(classifier)
    reference = reference_from_images(train_x, extractor, 512, "cpu", "digits train split (16×16)")
    return data, PaletteTokenizer.load(data / "palette.json"), extractor, reference


@torch.no_grad()
def likelihood_accuracy(model: GPT, shards: Path, count: int = 200) -> float:
    """How much the model uses the class: the share of ``count`` held-out images whose own label gives the
    lowest NLL of the ten (argmin over labels of the image's mean token NLL; chance 0.1)."""
    tokens, labels = (part[:count] for part in run_demo.heldout_split(shards))
    nll = []
    for label in range(model.config.num_classes):
        logits = model(tokens, torch.full_like(labels, label)).logits
        nll.append(F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1))
    return float((torch.stack(nll, 1).argmin(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the run's folder under <cache>/runs")
    parser.add_argument("--method", default="ntp", choices=("ntp", "mutor2d"))
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    parser.add_argument("--sampling", action="append", default=[], help="cfg,temperature,top_k (default 2,1,0)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (export_ema/)")
    parser.add_argument("--samples", type=int, default=360)
    parser.add_argument("--colors", type=int, default=run_demo.NUM_COLORS, help="palette size (set model.vocab_size)")
    parser.add_argument("--shifts", type=int, default=len(SHIFTS), help="training copies per image (1: no shift)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "demo-sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_sweep_cpu.json")
    args = parser.parse_args(argv)
    setup_logging()
    data, palette, extractor, reference = cached_setup(args.cache, args.shifts, args.colors)

    run = args.cache / "runs" / args.name
    overrides = [f"data.root={data / 'shards' / 'train'}", f"out_dir={run}", f"seed={args.seed}"]
    path = ROOT / "configs" / "demo" / f"{args.method}.yaml"
    steps = args.steps or load_yaml(TrainConfig, path, args.set).steps
    overrides += [f"steps={steps}", f"save_every={steps}", *args.set]
    config = load_yaml(TrainConfig, path, overrides)
    run_demo.discard_if_edited(run, config, TrainConfig)
    start = time.perf_counter()
    result = train(config, resume="auto")
    train_s = None if result.nothing_to_do else time.perf_counter() - start
    if result.reason != "completed":
        raise SystemExit(f"{args.name}: {result.reason} at step {result.step}")
    step_s = run_demo.training_record(run)["step_s"]
    checkpoint = CheckpointManager(run / "checkpoints", 1).complete()[-1]
    weights = checkpoint / ("export_ema" if args.ema else "export")
    model = GPT.from_pretrained(weights).eval()
    params = sum(p.numel() for p in model.parameters())
    uses_class = likelihood_accuracy(model, data / "shards" / "test")
    data_order = read_manifest(data / "shards" / "train").raw.get("order", "sorted")  # older shards: folder order

    rows = []
    for text in args.sampling or ["2,1,0"]:
        cfg, temperature, top_k = text.split(",")
        sampling = SamplingConfig(cfg_scale=float(cfg), temperature=float(temperature), top_k=int(top_k), seed=0)
        tag = f"cfg{cfg}_t{temperature}_k{top_k}" + ("_ema" if args.ema else "")
        begin = time.perf_counter()
        results = evaluate(
            model, lambda codes: to_uint8(palette.decode(codes)),
            Scoring(extractor, reference, run_demo.class_consistency),
            EvalConfig(run / "eval" / tag, num_samples=args.samples, per_class=True, sampling=sampling, batch_size=120,
                       feature_batch_size=360, save_npz=False),
        )  # fmt: skip
        metrics = results["metrics"]
        row = {
            "name": args.name,
            "method": args.method,
            "seed": args.seed,
            "overrides": args.set,
            "shifts": args.shifts,
            "colors": palette.vocab_size,
            "data_order": data_order,
            "steps": steps,
            "batch": config.global_batch_size,
            "params": params,
            "step_s": step_s,
            "train_s": train_s,
            "ema": args.ema,
            "sampling": {"cfg_scale": float(cfg), "temperature": float(temperature), "top_k": int(top_k)},
            "class_consistency": metrics["class_consistency"],
            "likelihood_accuracy": uses_class,
            "fid": metrics["fid"],
            "eval_s": time.perf_counter() - begin,
            "load_1min": round(os.getloadavg()[0], 2),  # > 0.5 before the run: step_s and train_s are not idle
            "threads": torch.get_num_threads(),
            "command": " ".join(["python bench/demo_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        train_s = None  # the training time belongs to the first row only

    record = json.loads(args.out.read_text()) if args.out.is_file() else {**provenance("demo_sweep"), "rows": []}
    record["rows"] += rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
