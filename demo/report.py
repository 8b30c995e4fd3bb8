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


def comparison_table(summary: dict, metrics: Sequence, methods: dict[str, str], floor: dict | None = None) -> list[str]:
    """The result table: a row per metric ``(key, title, lower is better)``, mean ± std of each method
    (baseline first), their difference, the p-value, the verdict, and the real images' value (``floor``)."""
    (base, base_label), (treated, treated_label) = methods.items()
    header = f"| metric | {base_label} | {treated_label} | {treated_label} − {base_label} | p | verdict |"
    lines = [header + (" real held-out images |" if floor is not None else ""), "|---" * (7 if floor else 6) + "|"]
    for key, title, lower in metrics:
        s = summary[key]
        row = (f"| {title} {'↓' if lower else '↑'} | {cell(s[base])} | {cell(s[treated])} | {s['difference']:+.3f} | "
               f"{s['p_value']:.3f} | {s['verdict']} |")  # fmt: skip
        if floor is not None:
            row += f" {floor[key]:.3f} |" if key in floor else " – |"
        lines.append(row)
    return lines


def machine_record() -> dict:
    """What made a published demo's numbers: the machine, its CPU threads and the libraries' versions.
    The same command on the same machine and software gives the same numbers (tests/test_demo.py);
    another CPU, thread count or library version moves them (docs/benchmarks.md, the demo's variation)."""
    import importlib.metadata
    import platform
    import sys

    import torch

    versions = {}
    for package in ("torch", "numpy", "scikit-learn", "scipy", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


def readme_section(record: dict) -> str:
    """A published demo's README section, from its committed record (``bench/results/demo_*_cpu.json``):
    ``bench/report.py`` writes the same text from the same file, and a test checks it has not drifted."""
    m = record["machine_record"]
    versions = ", ".join(f"{name} {version}" for name, version in m["versions"].items())
    lines = [
        f"`{record['command']}` ({record['setting_line']}; {m['threads']} CPU threads, {m['cpu']} "
        f"({m['cpu_capability']}), {versions}; `{record['publish_command']}` regenerates this from "
        f"`bench/results/{record['file']}`):",
        "",
        *comparison_table(record["summary"], record["metrics"], record["methods"], record.get("floor")),
        "",
    ]
    lines += record.get("extra_lines", [])
    return "\n".join(lines).rstrip("\n")
