"""The digits demo's summary and report: statistics over seeds, the three figures, report.md.

Every fact the report states about the setting comes from the configs and data that ran
(:func:`setting`), so editing a config never leaves a stale sentence behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from demo.report import compare, comparison_table, convergence_panels
from mutor_vision.files import atomic_write_text

METHODS = {"ntp": "Next-token", "mutor2d": "MuToR-2D"}
METRICS = [  # (key, title, lower is better)
    ("fid", "FID (digits-CNN features)", True),
    ("inception_score", "Inception-style score (digits-CNN logits)", False),
    ("class_consistency", "Class consistency (the classifier agrees with the class)", False),
    ("precision", "Precision", False),
    ("recall", "Recall", False),
    ("heldout_nll", "Held-out next-token NLL (nats/token)", True),
]


def summarise(final: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean, std and a Welch t-test (MuToR-2D vs next-token) of every metric over seeds."""
    summary = {}
    for key, _, lower_better in METRICS:
        values = {m: [row[key] for row in final[m]] for m in METHODS}
        entry = compare(values["mutor2d"], values["ntp"], lower_better, METHODS["mutor2d"])
        summary[key] = {"ntp": entry.pop("baseline"), "mutor2d": entry.pop("treated"), **entry}
    return summary


def plot_convergence(evaluations: dict[str, dict[int, list[dict]]], path: Path) -> None:
    shown = [METRICS[2], METRICS[0], METRICS[5]]  # class consistency, FID, held-out NLL
    title = "Convergence on 16×16 digits: evaluation at every checkpoint (band: min to max over seeds)"
    convergence_panels(evaluations, shown, METHODS, title, path)


def plot_losses(records: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, label in METHODS.items():
        for tag, style in (("train/loss_ntp", "-"), ("train/loss_reg", ":")):
            if method == "ntp" and tag == "train/loss_reg":
                continue
            curves = [record["series"].get(tag, {}) for record in records[method].values()]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if steps:
                mean = np.mean([[c[s] for s in steps] for c in curves], axis=0)
                name = "L_ntp" if tag.endswith("ntp") else "L_reg (registers)"
                ax.plot(steps, mean, style, label=f"{label}: {name} (mean over seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Training loss on 16×16 digits (palette tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(folders: dict[str, Path], arrays: dict[str, np.ndarray], plan, path: Path, per_class: int = 8) -> None:
    """Real held-out digits beside each method's samples, one labelled row per class: ``folders`` are
    ``sample_c2i.py``'s output (method -> its folder, a row of ``per_class`` per class 0..9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    def row(images: list[np.ndarray]) -> np.ndarray:
        images = images + [np.zeros((16, 16, 3), np.uint8)] * (per_class - len(images))
        return np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in images], 1)

    panels = {"Real (held out)": [row(list(arrays["test_x"][arrays["test_y"] == c][:per_class])) for c in range(10)]}
    for method, label in METHODS.items():
        record = json.loads((folders[method] / "samples.json").read_text())
        by_class: dict[int, list[np.ndarray]] = {c: [] for c in range(10)}
        for name in record["files"]:  # NNNN_class<c>.png
            by_class[int(name.split("_class")[1].removesuffix(".png"))].append(
                np.asarray(Image.open(folders[method] / name))
            )
        panels[label] = [row(by_class[c][:per_class]) for c in range(10)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 5.5))
    for ax, (title, rows) in zip(axes, panels.items(), strict=True):
        ax.imshow(np.concatenate(rows, 0), interpolation="nearest")
        ax.set_title(title)
        ax.set_yticks([18 * c + 9 for c in range(10)], [f"class {c}" for c in range(10)])
        ax.set_xticks([])
    fig.suptitle(f"sample_c2i.py at step {plan.steps}, CFG {plan.cfg_scale}, training seed {plan.seeds[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setting(configs: dict, train_images: int, augmented_images: int, colors: int, params: int) -> dict:
    """The facts the report states about the setting, read from the configs and the data (never restated
    by hand, so the report cannot drift from what ran). ``configs``: method -> TrainConfig."""
    model = configs["mutor2d"].model
    registers = model.registers
    grid_tokens = model.grid_size**2
    return {
        "grid": model.grid_size,
        "d_max_2d": registers.d_max_2d,
        "targets": registers.d_max_2d**2 - 1,
        "registers": registers.num_registers or grid_tokens,
        "register_share": (registers.num_registers or grid_tokens) / grid_tokens,
        "weight": registers.weight,
        "batch": configs["ntp"].global_batch_size,
        "layers": model.n_layer,
        "dim": model.dim,
        "params_m": params / 1e6,
        "train_images": train_images,
        "copies": augmented_images // max(train_images, 1),
        "colors": colors,
    }


def write_report(
    out: Path, summary: dict, floor: dict, compute: dict, plan, facts: dict, seconds: float, threads: int
) -> None:
    """``plan``: the demo's Plan (seeds, steps, eval_every, samples, cfg_scale); ``facts``: :func:`setting`."""
    f = facts
    training_min = sum(c["step_s"] * c["steps"] for c in compute.values()) * len(plan.seeds) / 60

    lines = [
        "# mutor-vision demo: MuToR-2D vs next-token on 16×16 digits",
        "",
        f"{len(plan.seeds)} seeds per method, {plan.steps} steps of {f['batch']} images each, "
        f"evaluated every {plan.eval_every} steps "
        f"({plan.samples} samples, CFG {plan.cfg_scale}), on {threads} CPU threads (fp32). "
        f"Training, from the runs' logs (median step time × steps, every run): {training_min:.1f} min; this "
        f"invocation: {seconds / 60:.1f} min (runs trained by an earlier invocation are reused, not retrained). "
        "Mean ± standard deviation over seeds at the last step; "
        "the verdict is a Welch t-test (p < 0.05) of MuToR-2D against next-token.",
        "",
    ]
    lines += comparison_table(summary, METRICS, METHODS, floor)
    lines += [
        "",
        "## Compute, measured alike",
        "",
        "| | Next-token | MuToR-2D |",
        "|---|---|---|",
        f"| optimizer steps | {compute['ntp']['steps']} | {compute['mutor2d']['steps']} |",
        f"| images seen | {compute['ntp']['images']:,} | {compute['mutor2d']['images']:,} |",
        f"| token positions processed (incl. registers) | {compute['ntp']['positions']:,} | "
        f"{compute['mutor2d']['positions']:,} |",
        f"| median step time (s), from the training logs | {compute['ntp']['step_s']:.3f} | "
        f"{compute['mutor2d']['step_s']:.3f} |",
        "",
        "Both methods see the same images in the same number of steps (the paper's comparison); MuToR-2D "
        f"processes {f['registers']} register positions more per image (+{f['register_share']:.0%}), which the "
        "step time includes.",
        "",
        "## What this measures, and what it cannot say",
        "",
        f"- The geometry: a {f['grid']}×{f['grid']} token grid, raster order, 2D offsets with D = "
        f"{f['d_max_2d']} ({f['targets']} targets), {f['registers']} random register slots per image "
        f"({f['register_share']:.0%}), a = {f['weight']}, the same trainer, loader, checkpoints and evaluation "
        "code as ImageNet. The shared hyper-parameters were tuned once for next-token and frozen.",
        f"- It is not ImageNet: {f['train_images']:,} training digits (×{f['copies']} one-pixel shifts), a "
        f"{f['colors']}-colour palette instead of VQ-16, a {f['layers']}-layer {f['dim']}-wide model of "
        f"{f['params_m']:.2f} M parameters trained for minutes, a small digits CNN instead of Inception. FID "
        "here is not comparable with any published FID.",
        "- With a handful of seeds, only differences larger than the seed-to-seed spread mean anything; the "
        "verdict column says which. The last column measures the real held-out images the same way (the "
        "floor: what a perfect model would score with this many images); NLL has no real-image counterpart.",
        "",
        "![convergence](convergence.png)",
        "",
        "![samples](samples.png)",
        "",
        "![loss](loss.png)",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
