"""A CFG sweep: one evaluation per guidance scale, then a table, a plot and the best scale by FID.

Each scale is a complete, resumable sub-run of :func:`~mutor_vision.evaluation.run.evaluate` in
``<out>/cfg_<scale>/`` with its own settings stamp, so its numbers are those of a single-scale run
with the same settings, and a rerun samples only what is missing. Every sub-run's folder is checked
before any of them samples: a folder of another checkpoint stops the sweep with nothing written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mutor_vision.errors import ConfigError
from mutor_vision.evaluation.config import EvalConfig
from mutor_vision.evaluation.run import Decode, Scoring, check_folder, evaluate
from mutor_vision.files import atomic_write, atomic_write_json, atomic_write_text
from mutor_vision.models import GPT

METRICS = ("fid", "inception_score", "precision", "recall")


def parse_scales(text: str) -> list[float]:
    """``"1.5,1.75,2.0"`` -> [1.5, 1.75, 2.0]; anything else is one line naming the flag (exit 2)."""
    try:
        scales = [float(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"--cfg-scales {text!r}: not a comma-separated list of numbers (e.g. 1.5,1.75,2.0)") from None
    if not all(math.isfinite(s) and s >= 0 for s in scales):
        raise ConfigError(f"--cfg-scales {text!r}: every scale must be a number >= 0")
    if len(set(scales)) != len(scales):
        raise ConfigError(f"--cfg-scales {text!r}: a scale is listed twice")
    return scales


def scale_folder(out_dir: Path, scale: float) -> Path:
    return Path(out_dir) / f"cfg_{scale:g}"


def run_sweep(
    model: GPT, decode: Decode, scoring: Scoring, config: EvalConfig, scales: list[float]
) -> list[dict[str, Any]] | None:
    """One evaluation per scale into ``config.out_dir/cfg_<scale>``; their rows on rank 0, None elsewhere."""
    runs = {s: config.replace(out_dir=scale_folder(config.out_dir, s), sampling=config.sampling.replace(cfg_scale=s))
            for s in scales}  # fmt: skip
    for run in runs.values():  # every folder before any sampling: a mismatch writes nothing
        check_folder(model, run.for_model(model))
    rows = []
    for scale, run in runs.items():
        results = evaluate(model, decode, scoring, run)
        if results is not None:
            rows.append({"cfg_scale": scale, "folder": str(run.out_dir), "num_samples": results["num_samples"],
                         **{key: results["metrics"].get(key) for key in METRICS},
                         **({"warning": results["warning"]} if "warning" in results else {})})  # fmt: skip
    return rows or None


def summarise_sweep(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows and the best scale by FID (the lowest)."""
    measured = [row for row in rows if row["fid"] is not None]
    if not measured:
        raise ConfigError("--cfg-scales: no FID was computed (a sweep needs a reference)")
    best = min(measured, key=lambda row: row["fid"])
    warnings = sorted({row["warning"] for row in rows if "warning" in row})
    return {"rows": rows, "best": best, **({"warning": warnings[0]} if warnings else {})}


def write_sweep(out_dir: Path, summary: dict[str, Any]) -> None:
    """``sweep.json``, ``sweep.md`` (the table, the best scale, the full run's command) and ``sweep.png``."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "sweep.json", summary)
    header = "| CFG | FID | IS | precision | recall | samples | folder |"
    lines = ["# CFG sweep", ""]
    if summary.get("warning"):
        lines += [f"**{summary['warning']}**", ""]
    lines += [header, "|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        cells = [f"{row['cfg_scale']:g}", *(_number(row[key]) for key in METRICS), f"{row['num_samples']:,}"]
        lines.append("| " + " | ".join([*cells, f"`{Path(row['folder']).name}`"]) + " |")
    best = summary["best"]
    lines += ["", f"Best by FID: CFG {best['cfg_scale']:g} (FID {best['fid']:.3f}).", ""]
    if summary.get("full_run"):
        lines += ["The full run at it:", "", f"    {summary['full_run']}", ""]
    lines += ["![FID against IS](sweep.png)", ""]
    atomic_write_text(out_dir / "sweep.md", "\n".join(lines))
    plot_sweep(summary["rows"], out_dir / "sweep.png")


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """FID against IS, a point per scale, labelled with it."""
    import matplotlib  # lazy: a slow import, needed only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [row for row in rows if row["fid"] is not None and row["inception_score"] is not None]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["inception_score"] for r in points], [r["fid"] for r in points], "o-")
    for row in points:
        ax.annotate(f"{row['cfg_scale']:g}", (row["inception_score"], row["fid"]), textcoords="offset points",
                    xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("Inception Score")
    ax.set_ylabel("FID")
    ax.set_title("CFG sweep (labels: scale)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"
