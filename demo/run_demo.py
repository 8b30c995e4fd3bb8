"""The embedded demo: MuToR-2D against next-token on real images, on CPU, in minutes, no downloads.

    make demo                      # = python demo/run_demo.py --out runs/demo
    python demo/run_demo.py --smoke --out /tmp/demo    # a few steps of everything (the test suite)

scikit-learn's handwritten digits (1,797 8×8 images, 10 classes) -> a fitted palette tokenizer
-> token shards (tokenizer/encode_imagenet.py) -> train_c2i.py with configs/demo/{ntp,mutor2d}.yaml
-> eval/fid.py's pipeline with a digits classifier as the feature extractor -> FID, IS,
class-consistency accuracy, held-out next-token NLL -> runs/demo/report.md, samples.png, loss.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_c2i  # noqa: E402
from demo.digits import digits_extractor, load_digits_rgb, train_classifier, write_image_folder  # noqa: E402
from mutor_vision.evaluation import evaluate, reference_from_images  # noqa: E402
from mutor_vision.models import GPT, SamplingConfig  # noqa: E402
from mutor_vision.shards import iter_samples, read_manifest  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager  # noqa: E402
from tokenizer import PaletteTokenizer, to_uint8  # noqa: E402
from tokenizer.encode_imagenet import run as encode  # noqa: E402

log = logging.getLogger("demo")
MODELS = {"ntp": "Next-token", "mutor2d": "MuToR-2D"}
NUM_COLORS = 16


def prepare_data(out: Path) -> tuple[Path, PaletteTokenizer, dict]:
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)  # cheap to rebuild; never mix shards of two runs
    data.mkdir(parents=True)
    train_x, train_y, test_x, test_y = load_digits_rgb()
    palette = PaletteTokenizer.fit(train_x, num_colors=NUM_COLORS)
    palette.save(data / "palette.json")
    for split, (x, y) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        write_image_folder(x, y, data / "images" / split)
        encode(
            ["--input", str(data / "images" / split), "--out", str(data / "shards" / split),
             "--tokenizer", "palette", "--tokenizer-path", str(data / "palette.json"), "--image-size", "8",
             "--crop", "center", "--maxcount", "100", "--batch-size", "256", "--workers", "2"]
        )  # fmt: skip
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    return data, palette, arrays


def train_model(name: str, data: Path, out: Path, smoke: bool) -> tuple[Path, float]:
    overrides = [f"data.root={data / 'shards' / 'train'}", f"out_dir={out / name}"]
    if smoke:
        overrides += ["steps=4", "save_every=2", "log_every=2", "optim.warmup_steps=1"]
    start = time.perf_counter()
    code = train_c2i.main(["--config", str(ROOT / "configs" / "demo" / f"{name}.yaml"), "--resume", "auto", *overrides])
    if code != 0:
        raise SystemExit(f"demo: training {name} failed (exit {code})")
    latest = CheckpointManager(out / name / "checkpoints", 1).latest()
    return latest / "export", time.perf_counter() - start


@torch.no_grad()
def heldout_nll(model: GPT, shards: Path) -> float:
    """Mean next-token NLL (nats per token) of the held-out split, every sample once."""
    model.eval()
    total, count = 0.0, 0
    for _, grids, label in iter_samples(read_manifest(shards)):
        tokens = torch.from_numpy(grids[:1].astype(np.int64)).flatten(1)
        labels = torch.tensor([label])
        logits = model(tokens, labels).logits
        total += F.cross_entropy(logits[0], tokens[0], reduction="sum").item()
        count += tokens.numel()
    return total / count


def class_consistency(labels: np.ndarray, features) -> dict[str, float]:
    logits = features[1]
    return {"class_consistency": float((logits.argmax(axis=1) == labels).mean())}


def loss_curves(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, title in MODELS.items():
        files = sorted((out / name / "logs").rglob("events.out.tfevents.*"))
        if not files:
            continue
        events = EventAccumulator(str(files[-1]))
        events.Reload()
        tags = events.Tags()["scalars"]
        for tag, style in (("train/loss_ntp", "-"), ("train/loss_reg", ":")):
            if tag in tags and (tag != "train/loss_reg" or name != "ntp"):
                points = events.Scalars(tag)
                label = f"{title}: {'L_ntp' if tag.endswith('ntp') else 'L_reg (registers)'}"
                ax.plot([p.step for p in points], [p.value for p in points], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Training loss on 8×8 digits (palette tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grids(out: Path, path: Path, per_class: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(MODELS), figsize=(4 * len(MODELS), 5))
    for ax, (name, title) in zip(axes, MODELS.items(), strict=True):
        folder = out / name / "eval" / "samples"
        count = len(list(folder.glob("*.png")))
        rows = []
        for c in range(10):  # sample i has class i % 10
            picks = [i for i in range(c, count, 10)][:per_class]
            row = [np.asarray(Image.open(folder / f"{i:06d}.png")) for i in picks]
            row += [np.zeros((8, 8, 3), np.uint8)] * (per_class - len(row))
            rows.append(np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in row], 1))
        ax.imshow(np.concatenate(rows, 0), interpolation="nearest")
        ax.set_title(f"{title}: one row per class 0-9")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, rows: dict, settings: dict, seconds: float) -> None:
    def fmt(value, digits=3):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    metrics = [
        ("FID (digits-CNN features) ↓", "fid"),
        ("Inception-style score (digits-CNN logits) ↑", "inception_score"),
        ("Class consistency (classifier agrees with the class) ↑", "class_consistency"),
        ("Precision ↑", "precision"),
        ("Recall ↑", "recall"),
        ("Held-out next-token NLL (nats/token) ↓", "heldout_nll"),
        ("Training time (s)", "train_seconds"),
    ]
    lines = [
        "# mutor-vision demo: MuToR-2D vs next-token on 8×8 digits",
        "",
        f"Run time: {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads (fp32). "
        "Numbers are whatever this run produced; a tiny model on tiny data, so differences are noisy.",
        "",
        "| metric | " + " | ".join(MODELS.values()) + " |",
        "|---|" + "---|" * len(MODELS),
    ]
    for title, key in metrics:
        lines.append(f"| {title} | " + " | ".join(fmt(rows[name].get(key, "–")) for name in MODELS) + " |")
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    lines += ["![samples](samples.png)", "", "![loss](loss.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--samples", type=int, default=1000, help="samples per model for the metrics")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        for name in MODELS:
            shutil.rmtree(out / name, ignore_errors=True)
    samples = 20 if args.smoke else args.samples

    data, palette, arrays = prepare_data(out)
    classifier = train_classifier(arrays["train_x"], arrays["train_y"], epochs=1 if args.smoke else 15)
    extractor = digits_extractor(classifier)
    with torch.no_grad():
        test_logits = classifier.features(torch.from_numpy(arrays["test_x"]).permute(0, 3, 1, 2))[1]
    classifier_accuracy = float((test_logits.argmax(1).numpy() == arrays["test_y"]).mean())
    reference = reference_from_images(arrays["test_x"], extractor, 256, "cpu", "digits test split")

    def decode(codes: torch.Tensor) -> torch.Tensor:
        return to_uint8(palette.decode(codes))

    rows: dict[str, dict] = {}
    for name in MODELS:
        export, train_seconds = train_model(name, data, out, args.smoke)
        model = GPT.from_pretrained(export).eval()
        shutil.rmtree(out / name / "eval", ignore_errors=True)  # fresh samples every run
        results = evaluate(
            model, decode, extractor, reference, out / name / "eval", num_samples=samples,
            sampling=SamplingConfig(cfg_scale=args.cfg_scale, seed=0), batch_size=100, feature_batch_size=256,
            save_npz=False,
            extra_metrics=class_consistency,
        )  # fmt: skip
        rows[name] = {
            **results["metrics"],
            "heldout_nll": heldout_nll(model, data / "shards" / "test"),
            "train_seconds": train_seconds,
            "parameters": model.num_parameters(include_register=False),
        }
    sample_grids(out, out / "samples.png")
    loss_curves(out, out / "loss.png")
    manifest = read_manifest(data / "shards" / "train")
    settings = {
        "data": f"scikit-learn digits: {manifest.num_samples} train / {len(arrays['test_x'])} held-out images, 8x8",
        "tokenizer": f"palette, {palette.vocab_size} colours (k-means on train pixels), one token per pixel",
        "configs": ["configs/demo/ntp.yaml", "configs/demo/mutor2d.yaml"]
        + (["--smoke overrides"] if args.smoke else []),
        "samples_per_model": samples,
        "cfg_scale": args.cfg_scale,
        "feature_extractor": "digits CNN (torch-fidelity custom extractor 'demo-digits-cnn')",
        "classifier_test_accuracy": classifier_accuracy,
        "parameters": rows["ntp"]["parameters"],
    }
    seconds = time.perf_counter() - start
    write_report(out, rows, settings, seconds)
    summary = {"rows": rows, "settings": settings, "seconds": seconds}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    log.info("demo done in %.1f min: %s", seconds / 60, out / "report.md")
    return summary


if __name__ == "__main__":
    main()
