"""The embedded demo: MuToR-2D against next-token on real images, the paper's geometry in miniature.

    make demo                        # = python demo/run_demo.py --out runs/demo   (3 seeds, ~10-15 min, CPU)
    make demo-full                   # = python demo/run_demo.py --full --out runs/demo-full   (5 seeds, longer)
    python demo/run_demo.py --smoke --out /tmp/demo   # a few steps of everything (the test suite)

scikit-learn's handwritten digits brought to 16×16 (bicubic), augmented by one-pixel shifts ->
a 16-colour palette tokenizer -> token shards (tokenizer/encode_imagenet.py) -> train_c2i's
trainer with configs/demo/{ntp,mutor2d}.yaml: a 16×16 grid, D = 4, 80 registers (31 % of the
slots), a = 0.5, the same steps and images for both, several seeds -> eval/fid.py's evaluation
at every checkpoint with a digits classifier standing in for Inception -> FID, IS, class
consistency, precision/recall and held-out NLL, mean ± std over seeds with a Welch t-test ->
runs/demo/report.md, convergence.png, loss.png, samples.png, report.json.

Rerunning resumes what is there: finished runs are evaluated again from their samples, an
interrupted run continues from its checkpoint, and a run whose config was edited is trained anew.
Ctrl-C stops after saving and says how to continue; it never reports a half-trained model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample_c2i  # noqa: E402  (the repository root's sampling command)
from demo.digits import (  # noqa: E402
    SHIFTS,
    digits_extractor,
    load_digits_rgb,
    shifted,
    train_classifier,
    write_image_folder,
)
from demo.digits_report import (  # noqa: E402
    METHODS,
    METRICS,
    plot_convergence,
    plot_losses,
    plot_samples,
    setting,
    summarise,
    write_report,
)
from demo.report import machine_record, publish, readme_section  # noqa: E402
from demo.runs import discard_if_edited  # noqa: E402
from mutor_vision.cli import HelpFormatter, setup_logging  # noqa: E402
from mutor_vision.config import load_yaml  # noqa: E402
from mutor_vision.evaluation import EvalConfig, Scoring, evaluate, reference_from_images  # noqa: E402
from mutor_vision.evaluation.metrics import frechet_distance, inception_score, precision_recall, statistics  # noqa: E402
from mutor_vision.files import atomic_write_json  # noqa: E402
from mutor_vision.models import GPT, SamplingConfig  # noqa: E402
from mutor_vision.shards import iter_samples, read_manifest  # noqa: E402
from mutor_vision.training.c2i import train  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager, checkpoint_step  # noqa: E402
from mutor_vision.training.config import TrainConfig  # noqa: E402
from tokenizer import PaletteTokenizer, to_uint8  # noqa: E402
from tokenizer.encode_imagenet import run as encode  # noqa: E402

log = logging.getLogger("demo")
NUM_COLORS = 16


@dataclass(frozen=True)
class Plan:
    """What one demo run does."""

    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    samples: int  # per evaluation (the held-out split has 360 images: the floor row uses the same count)
    cfg_scale: float
    classifier_epochs: int
    images_per_class: int | None = None  # the smoke run takes a few images per class; None: all
    loader: tuple[str, ...] = ()  # config overrides of the loader (the smoke run: no worker, a small buffer)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        if args.smoke:
            return cls((0, 1), 4, 2, 20, args.cfg_scale, 1, 8, ("data.num_workers=0", "data.shuffle_buffer=16"))
        if args.full:
            return cls((0, 1, 2, 3, 4), 19200, 2400, 360, args.cfg_scale, 15)
        return cls(tuple(range(args.seeds)), 4800, 1200, 360, args.cfg_scale, 15)


class Interrupted(SystemExit):
    """Training stopped on a signal after saving: the demo stops too, and says how to continue."""


# ---------------------------------------------------------------- data


def prepare_data(
    out: Path,
    images_per_class: int | None = None,
    shifts: tuple[tuple[int, int], ...] = SHIFTS,
    num_colors: int = NUM_COLORS,
) -> tuple[Path, PaletteTokenizer, dict[str, np.ndarray]]:
    """Digits at 16×16 -> palette -> token shards (train: a copy of each image per shift; test: as is)."""
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)  # deterministic and cheap (~10 s): never mix two versions
    data.mkdir(parents=True)
    train_x, train_y, test_x, test_y = load_digits_rgb()
    if images_per_class is not None:
        train_x, train_y = _per_class(train_x, train_y, images_per_class)
        test_x, test_y = _per_class(test_x, test_y, images_per_class)
    palette = PaletteTokenizer.fit(train_x, num_colors=num_colors)
    palette.save(data / "palette.json")
    augmented = shifted(train_x, train_y, shifts)
    for split, (x, y) in {"train": augmented, "test": (test_x, test_y)}.items():
        write_image_folder(x, y, data / "images" / split)
        encode(
            ["--input", str(data / "images" / split), "--out", str(data / "shards" / split),
             "--tokenizer", "palette", "--tokenizer-path", str(data / "palette.json"), "--image-size", "16",
             "--crop", "center", "--maxcount", "400", "--batch-size", "512", "--workers", "2"]
        )  # fmt: skip
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return data, palette, arrays


def _per_class(images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:count] for c in range(10)])
    return images[keep], labels[keep]


# ---------------------------------------------------------------- training


def train_run(method: str, seed: int, data: Path, out: Path, plan: Plan) -> Path:
    """Train (or resume, or keep) one run; a run whose recorded config differs is trained anew."""
    run = out / f"{method}-seed{seed}"
    overrides = [f"data.root={data / 'shards' / 'train'}", f"out_dir={run}", f"seed={seed}"]
    overrides += [f"steps={plan.steps}", f"save_every={plan.eval_every}", *plan.loader]
    config = load_yaml(TrainConfig, ROOT / "configs" / "demo" / f"{method}.yaml", overrides)
    discard_if_edited(run, config, TrainConfig)
    result = train(config, resume="auto")
    if result.reason != "completed":
        raise Interrupted(
            f"demo: {run.name} stopped at step {result.step} of {plan.steps} (checkpoint saved); "
            "run the same command again to continue"
        )
    return run


def training_record(run: Path) -> dict[str, float]:
    """From the run's TensorBoard files (all of them: a resumed run writes several): step time, curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for path in sorted((run / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    step_s = series.get("perf/step_s", {})
    return {"step_s": float(np.median(list(step_s.values()))) if step_s else float("nan"), "series": series}


# ---------------------------------------------------------------- evaluation


def heldout_split(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split as (tokens (N, 256) of each sample's first crop, labels (N,)), in shard order."""
    tokens, labels = [], []
    for _, grids, label in iter_samples(read_manifest(shards)):
        tokens.append(torch.from_numpy(grids[0].astype(np.int64)).flatten())
        labels.append(label)
    return torch.stack(tokens), torch.tensor(labels)


@torch.no_grad()
def heldout_nll(model: GPT, shards: Path) -> float:
    """Mean next-token NLL (nats per token) of the held-out split, every sample once."""
    model.eval()
    tokens, labels = heldout_split(shards)
    logits = model(tokens, labels).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)).item()


def class_consistency(labels: np.ndarray, features) -> dict[str, float]:
    return {"class_consistency": float((features[1].argmax(axis=1) == labels).mean())}


def draw_samples(out: Path, plan: Plan, per_class: int = 8) -> dict[str, Path]:
    """Each method's first seed at its last step, drawn by ``sample_c2i.py``: a row of ``per_class`` for
    each class, with the evaluation's CFG and no top-k (the samples figure shows them)."""
    folders = {}
    for method in METHODS:
        run = out / f"{method}-seed{plan.seeds[0]}"
        export = run / "checkpoints" / f"step_{plan.steps:08d}" / "export"
        folders[method] = run / "samples"
        sample_c2i.run([
            "--ckpt", str(export), "--classes", ",".join(map(str, range(10))), "--per-class", str(per_class),
            "--cfg-scale", str(plan.cfg_scale), "--top-k", "0", "--device", "cpu", "--out", str(folders[method]),
        ])  # fmt: skip
    return folders


def evaluated_checkpoints(run: Path, plan: Plan) -> list[Path]:
    """The run's checkpoints on the evaluation cadence; one saved by an interrupt is left out, so
    every seed is compared at the same steps."""
    complete = CheckpointManager(run / "checkpoints", 1).complete()
    return [c for c in complete if checkpoint_step(c) % plan.eval_every == 0 or checkpoint_step(c) == plan.steps]


def evaluate_run(run: Path, data: Path, palette: PaletteTokenizer, extractor, reference, plan: Plan) -> list[dict]:
    """Every checkpoint of a run: FID / IS / consistency / P / R on fresh samples, and the held-out NLL."""
    rows = []
    for checkpoint in evaluated_checkpoints(run, plan):
        step = checkpoint_step(checkpoint)
        model = GPT.from_pretrained(checkpoint / "export").eval()
        config = EvalConfig(
            run / "eval" / f"step_{step:08d}", num_samples=plan.samples, per_class=True,  # class consistency: balanced
            sampling=SamplingConfig(cfg_scale=plan.cfg_scale, seed=0), batch_size=120, feature_batch_size=360,
            save_npz=False,
        )  # fmt: skip
        decode = lambda codes: to_uint8(palette.decode(codes))  # noqa: E731
        results = evaluate(model, decode, Scoring(extractor, reference, class_consistency), config)
        rows.append({"step": step, **results["metrics"], "heldout_nll": heldout_nll(model, data / "shards" / "test")})
    return rows


def real_floor(arrays: dict[str, np.ndarray], extractor, reference, count: int) -> dict[str, float]:
    """The held-out real images measured like samples: what a perfect model would score (the floor)."""
    from mutor_vision.evaluation import extract_features

    images, labels = arrays["test_x"][:count], arrays["test_y"][:count]
    pool, logits = extract_features(extractor, images, 360)
    return {
        "fid": frechet_distance(statistics(pool), {"mu": reference.mu, "sigma": reference.sigma}),
        "inception_score": inception_score(logits)[0],
        "class_consistency": float((logits.argmax(axis=1) == labels).mean()),
        **dict(zip(("precision", "recall"), precision_recall(pool, reference.features, k=3), strict=True)),
    }


# ---------------------------------------------------------------- main

FIGURES = {name: ROOT / "docs" / "figures" / f"demo_digits_{name}" for name in ("samples.png", "convergence.png")}


RECORD = ROOT / "bench" / "results" / "demo_digits_cpu.json"


def publish_report(out: Path, report: dict) -> None:
    """The run's record into bench/results/demo_digits_cpu.json (its numbers, the machine and the
    libraries' versions), the README section written from it, and the samples and convergence figures
    into docs/figures/."""
    plan, compute = report["plan"], report["compute"]
    # Training time from the runs' logs, not this invocation's: a rerun that reuses the runs is quick.
    training_min = sum(c["step_s"] * c["steps"] for c in compute.values()) * len(plan["seeds"]) / 60
    record = {
        "benchmark": "demo_digits",
        "file": RECORD.name,
        "command": "make demo" if len(plan["seeds"]) == 3 and plan["steps"] == 4800 else "make demo-full",
        "publish_command": "python demo/run_demo.py --publish",
        "setting_line": f"{len(plan['seeds'])} seeds × {plan['steps']} steps of {report['setting']['batch']} images "
        "per method",
        "training_min": training_min,  # from the runs' logs; it depends on the machine and its load
        "metrics": METRICS,
        "methods": METHODS,
        "summary": report["summary"],
        "floor": report["floor"],
        "extra_lines": [
            "![digits samples](docs/figures/demo_digits_samples.png)",
            "![digits convergence](docs/figures/demo_digits_convergence.png)",
        ],
        "machine_record": machine_record(),
        "plan": plan,
        "compute": compute,
        "setting": report["setting"],
    }
    atomic_write_json(RECORD, record)
    publish(ROOT / "README.md", "demo", readme_section(record), {out / n: path for n, path in FIGURES.items()})


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo/run_demo.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="the demo's folder (resumed)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (the default setting)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance of the evaluations")
    parser.add_argument("--full", action="store_true", help="the longer setting: 5 seeds, 19,200 steps")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--publish", action="store_true", help="write the table into README.md, the figures to docs/")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.publish and args.smoke:
        parser.error("--publish reports a real setting, not --smoke")
    setup_logging()
    start = time.perf_counter()
    plan, out = Plan.of(args), args.out
    out.mkdir(parents=True, exist_ok=True)
    data, palette, arrays = prepare_data(out, plan.images_per_class)
    classifier = train_classifier(arrays["train_x"], arrays["train_y"], epochs=plan.classifier_epochs)
    extractor = digits_extractor(classifier)
    reference = reference_from_images(arrays["train_x"], extractor, 512, "cpu", "digits train split (16×16)")
    floor = real_floor(arrays, extractor, reference, plan.samples)

    evaluations: dict[str, dict[int, list[dict]]] = {m: {} for m in METHODS}
    records: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
    for seed in plan.seeds:
        for method in METHODS:
            run = train_run(method, seed, data, out, plan)
            records[method][seed] = training_record(run)
            evaluations[method][seed] = evaluate_run(run, data, palette, extractor, reference, plan)
    final = {m: [rows[-1] for rows in evaluations[m].values()] for m in METHODS}
    summary = summarise(final)
    compute, configs = {}, {}
    for method in METHODS:
        config = configs[method] = load_yaml(TrainConfig, ROOT / "configs" / "demo" / f"{method}.yaml")
        registers = config.model.registers
        per_image = config.model.num_tokens + ((registers.num_registers or 256) if registers.enabled else 0)
        images = plan.steps * config.global_batch_size
        step_s = float(np.median([r["step_s"] for r in records[method].values()]))
        compute[method] = {"steps": plan.steps, "images": images, "positions": images * per_image, "step_s": step_s}
    plot_convergence(evaluations, out / "convergence.png")
    plot_losses(records, out / "loss.png")
    plot_samples(draw_samples(out, plan), arrays, plan, out / "samples.png")
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in GPT(configs["mutor2d"].model).parameters())
    facts = setting(configs, len(arrays["train_x"]), len(arrays["train_x"]) * len(SHIFTS), NUM_COLORS, params)
    write_report(out, summary, floor, compute, plan, facts, seconds, torch.get_num_threads())
    report = {
        "plan": plan.__dict__,
        "summary": summary,
        "floor": floor,
        "compute": compute,
        "setting": facts,
        "evaluations": evaluations,
        "seconds": seconds,
    }
    atomic_write_json(out / "report.json", report)
    if args.publish:
        publish_report(out, report)
    log.info("demo done in %.1f min: %s", seconds / 60, out / "report.md")
    return report


if __name__ == "__main__":
    main()
