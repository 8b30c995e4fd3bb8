"""A few-step run of the whole demo: data, tokenizer, shards, two seeds of both methods, evaluations at
every checkpoint, the statistics, the report; then a rerun that resumes instead of retraining."""

import json
import shutil

import pytest

from demo import run_demo
from demo.digits_report import METRICS


def test_demo_smoke(tmp_path):
    report = run_demo.main(["--smoke", "--out", str(tmp_path)])
    for key, _, _ in METRICS:
        entry = report["summary"][key]
        for method in ("ntp", "mutor2d"):
            values = entry[method]["values"]
            assert len(values) == 2 and all(v == v for v in values), (key, method)  # two seeds, no NaN
        assert 0.0 <= entry["p_value"] <= 1.0 and "spread" in entry["verdict"]
    assert set(report["floor"]) == {"fid", "inception_score", "class_consistency", "precision", "recall"}
    assert [row["step"] for row in report["evaluations"]["mutor2d"][0]] == [
        2,
        4,
    ]  # an evaluation at every checkpoint: the convergence curves
    assert report["compute"]["mutor2d"]["positions"] == report["compute"]["ntp"]["positions"] * 336 // 256
    text = (tmp_path / "report.md").read_text()
    assert "| Next-token | MuToR-2D |" in text and "seed-to-seed spread" in text and "It is not ImageNet" in text
    # the setting's facts come from the configs that ran: 80 of 256 slots, D = 4 (15 targets), a = 0.5
    assert "80 random register slots per image (31%)" in text and "D = 4 (15 targets)" in text, text
    assert report["setting"]["train_images"] == 80  # the smoke run: 8 digits per class
    for picture in ("convergence.png", "samples.png", "loss.png"):
        assert (tmp_path / picture).stat().st_size > 0
    state = json.loads((tmp_path / "mutor2d-seed1" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["config"]["model"]["registers"]["mode"] == "mutor2d" and state["config"]["seed"] == 1


def test_demo_stops_on_an_interrupted_run_and_retrains_an_edited_one(tmp_path, monkeypatch):
    from mutor_vision.training.runtime import TrainResult

    plan = run_demo.Plan((0,), 4, 2, 20, 2.0, 1, 8, ("data.num_workers=0", "data.shuffle_buffer=16"))
    data, _, _ = run_demo.prepare_data(tmp_path, plan.images_per_class)
    monkeypatch.setattr(run_demo, "train", lambda config, resume: TrainResult(step=2, reason="terminated"))
    with pytest.raises(run_demo.Interrupted, match=r"stopped at step 2 of 4.*again to continue"):
        run_demo.train_run("ntp", 0, data, tmp_path, plan)
    monkeypatch.undo()
    run = run_demo.train_run("ntp", 0, data, tmp_path, plan)
    interrupt_save = run / "checkpoints" / "step_00000003"  # as a SIGTERM between the cadence's saves
    shutil.copytree(run / "checkpoints" / "step_00000004", interrupt_save)
    assert [c.name for c in run_demo.evaluated_checkpoints(run, plan)] == ["step_00000002", "step_00000004"]
    shutil.rmtree(interrupt_save)
    before = (run / "checkpoints" / "step_00000004" / "state.json").stat().st_mtime_ns
    run_demo.train_run("ntp", 0, data, tmp_path, plan)  # unchanged: kept as is
    assert (run / "checkpoints" / "step_00000004" / "state.json").stat().st_mtime_ns == before
    edited = run_demo.Plan((0,), 4, 4, 20, 2.0, 1, 8, plan.loader)  # another checkpoint cadence: another config
    run_demo.train_run("ntp", 0, data, tmp_path, edited)
    assert not (run / "checkpoints" / "step_00000002").exists()  # trained anew, not resumed


def test_publish_rewrites_only_its_readme_section_and_copies_the_figures(tmp_path):
    from demo.report import publish

    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- demo:start -->\nold table\n<!-- demo:end -->\n"
        "<!-- demo-text:start -->\nkept\n<!-- demo-text:end -->\n"
    )
    figure = tmp_path / "runs" / "samples.png"
    figure.parent.mkdir()
    figure.write_bytes(b"png")
    publish(readme, "demo", "new table", {figure: tmp_path / "docs" / "figures" / "demo_digits_samples.png"})
    assert readme.read_text() == (
        "intro\n<!-- demo:start -->\nnew table\n<!-- demo:end -->\n"
        "<!-- demo-text:start -->\nkept\n<!-- demo-text:end -->\n"
    )
    assert (tmp_path / "docs" / "figures" / "demo_digits_samples.png").read_bytes() == b"png"
    with pytest.raises(SystemExit, match="no <!-- absent:start -->"):
        publish(readme, "absent", "x", {})


def test_the_same_command_on_the_same_machine_gives_the_same_numbers(tmp_path):
    # The published tables say which machine and versions made them (bench/results/demo_*_cpu.json);
    # on one machine with the same software, a second run reproduces every number exactly.
    first = run_demo.main(["--smoke", "--out", str(tmp_path / "a")])
    second = run_demo.main(["--smoke", "--out", str(tmp_path / "b")])
    assert first["evaluations"] == second["evaluations"] and first["floor"] == second["floor"]
