"""What both demos report: mean ± std over seeds and a Welch t-test verdict per metric."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def compare(treated: Sequence[float], baseline: Sequence[float], lower_better: bool, name: str) -> dict:
    """Mean, std and values of both sides, their difference, and whether it exceeds the seed spread.

    ``name`` is the treated method's name in the verdict. The verdict is a Welch t-test at p < 0.05;
    with one seed a side (or identical values) there is no evidence of a difference.
    """
    from scipy.stats import ttest_ind

    values = {"treated": np.asarray(treated, dtype=float), "baseline": np.asarray(baseline, dtype=float)}
    sides = {
        side: {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "values": v.tolist(),
        }
        for side, v in values.items()
    }
    difference = sides["treated"]["mean"] - sides["baseline"]["mean"]
    p = 1.0
    if len(values["treated"]) > 1 and len(values["baseline"]) > 1:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nearly identical values: scipy warns, the p-value says it all
            p = float(ttest_ind(values["treated"], values["baseline"], equal_var=False).pvalue)
        p = p if np.isfinite(p) else 1.0  # identical values on both sides: no evidence of a difference
    if p >= 0.05:
        verdict = "within the seed-to-seed spread"
    else:
        better = (difference < 0) == lower_better
        verdict = f"{name} {'better' if better else 'worse'}, beyond the seed-to-seed spread"
    return {**sides, "difference": difference, "p_value": p, "verdict": verdict}


def cell(entry: dict) -> str:
    """``mean ± std`` (just the mean with one seed)."""
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if np.isfinite(entry["std"]) else f"{entry['mean']:.3f}"


def plot_seed_band(ax, steps: list[int], values: np.ndarray, label: str) -> None:
    """The mean over seeds of ``values`` (seeds, steps) as a line, min to max as a band."""
    ax.plot(steps, values.mean(0), marker="o", label=f"{label} (mean of {len(values)} seeds)")
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)


def convergence_panels(evaluations: dict, metrics: list, methods: dict[str, str], title: str, path: Path) -> None:
    """One panel per metric ``(key, title, lower is better)``: each method's mean over seeds against the step,
    min to max as a band. ``evaluations``: method -> seed -> rows of ``{"step": ..., key: ...}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4))
    for ax, (key, name, lower) in zip(axes, metrics, strict=True):
        for method, label in methods.items():
            runs = evaluations[method]
            steps = sorted({row["step"] for rows in runs.values() for row in rows})
            values = np.array([[next(r[key] for r in rows if r["step"] == s) for s in steps] for rows in runs.values()])
            plot_seed_band(ax, steps, values, label)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{name} {'↓' if lower else '↑'}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish(readme: Path, section: str, body: str, figures: dict[Path, Path]) -> None:
    """``body`` into ``readme``'s ``section`` (between its markers) and each figure copied (source ->
    destination): what ``--publish`` of a demo regenerates."""
    from mutor_vision.files import write_section

    write_section(readme, section, body)
    for source, destination in figures.items():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
