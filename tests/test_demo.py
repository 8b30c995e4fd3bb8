"""A few-step run of the whole demo pipeline: data, tokenizer, shards, both trainings, evaluation, report."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.run_demo import main  # noqa: E402


def test_demo_smoke(tmp_path):
    summary = main(["--smoke", "--out", str(tmp_path)])
    for name in ("ntp", "mutor2d"):
        row = summary["rows"][name]
        for key in ("fid", "inception_score", "class_consistency", "heldout_nll"):
            assert key in row and row[key] == row[key], (name, key)  # present and not NaN
        assert 0.0 <= row["class_consistency"] <= 1.0 and row["heldout_nll"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| Next-token | MuToR-2D |" in report and "FID" in report
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0
    state = json.loads((tmp_path / "mutor2d" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["config"]["model"]["registers"]["mode"] == "mutor2d"
