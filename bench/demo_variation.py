"""Where the digits demo's numbers move between machines: one demo run trained and evaluated again under
each source of variation this machine can imitate, against the same run repeated unchanged.

    python bench/demo_variation.py --out bench/results/demo_variation_cpu.json

Each variant is ``bench/demo_sweep.py`` (the demo's data, trainer, classifier and evaluation; the data
and the classifier made once and shared, so only training and sampling vary) in a process of its
own with one thing changed: ``repeat`` (nothing: the same command on the same machine), ``threads1``
(one CPU thread instead of all), ``avx2`` (PyTorch's and oneDNN's kernels held to AVX2, as on a CPU
without AVX-512). Each row records the final weights' digest and the metrics; ``identical_weights``
says whether the variant trained bit for bit the same model as ``base``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "base": {},
    "repeat": {},
    "threads1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def weights_digest(run: Path) -> str:
    """sha256 of the final export's weights file."""
    exports = sorted(run.glob("checkpoints/step_*/export/model.safetensors"))
    return hashlib.sha256(exports[-1].read_bytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mutor2d", help="the demo config: ntp or mutor2d")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per variant")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "demo-variation", help="data, classifier, runs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default=None, help="the results JSON")
    args = parser.parse_args()
    rows = {}
    for name in args.variants.split(","):
        env = {**os.environ, **VARIANTS[name], "PYTHONPATH": str(ROOT)}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            command = [sys.executable, str(ROOT / "bench" / "demo_sweep.py"), "--name", f"variation-{name}",
                       "--method", args.method, "--steps", str(args.steps), "--cache", str(args.cache),
                       "--out", str(out)]  # fmt: skip
            subprocess.run(command, env=env, check=True, cwd=ROOT)
            row = json.loads(out.read_text())["rows"][-1]
        rows[name] = {
            "env": VARIANTS[name],
            "threads": row["threads"],
            "weights": weights_digest(args.cache / "runs" / f"variation-{name}"),
            **{key: row[key] for key in ("class_consistency", "fid", "likelihood_accuracy")},
        }
        print(name, rows[name], flush=True)
    base = rows.get("base")
    for row in rows.values():
        row["identical_weights"] = base is not None and row["weights"] == base["weights"]
        if base is not None:
            row["minus_base"] = {k: row[k] - base[k] for k in ("class_consistency", "fid", "likelihood_accuracy")}
    save(args.out, {**provenance("demo_variation", "cpu"), "config": vars(args) | {"cache": str(args.cache)},
                    "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
