"""``make gpu-check`` (bench/gpu_check.py) on CPU: the stage list, the budget logic, the JSON it
writes after every stage, the targets table, and the train-step variants it asks for."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # bench/ is a folder of scripts, not a package
from gpu_check import Stage, device_slug, read_tier, run_all, select, skip_reason, targets


def fake(name: str, estimate: float, code: str) -> Stage:
    """A stage whose one command runs ``code`` (``OUT`` names its output folder)."""
    return Stage(name, f"fake {name}", estimate, lambda out: [[sys.executable, "-c", f"OUT = {str(out)!r}\n{code}"]])


def test_dry_run_lists_every_stage_in_order_and_exits_0(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    positions = [printed.index(f"  {stage.name} ") for stage in gpu_check.STAGES]
    assert positions == sorted(positions)
    assert "tier" in printed and "--budget-s 480" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path: this machine has CUDA")
def test_without_cuda_it_runs_nothing_and_exits_0(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_make_gpu_check_is_a_target():
    done = subprocess.run(["make", "-n", "gpu-check", "PY=python3"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "bench/gpu_check.py" in done.stdout


def test_stages_skip_past_the_budget_stop_at_it_and_the_json_is_written_after_each(tmp_path):
    path = tmp_path / "gpu_check_fake.json"
    rows = {"rows": [{"variant": "ntp", "step_s": 1.0, "images_per_s": 2400.0, "ratio_over_ideal": 1.0}]}
    stages = [
        fake("train_compiled", 1, f"import json; json.dump({rows!r}, open(OUT + '/compiled_chunk0.json', 'w'))"),
        # Runs after the first stage: the file already holds that stage's rows.
        fake("sample", 1, f"import json; d = json.load(open({str(path)!r})); assert d['stages']['train_compiled']"),
        fake("eval", 1, "raise SystemExit(3)"),
        fake("draft", 1, "import time; time.sleep(60)"),  # stopped at the budget
        fake("llamagen", 100, "pass"),  # its estimate no longer fits
    ]
    result = run_all(stages, 8.0, path, {"benchmark": "gpu_check", "device": "fake"}, tmp_path / "log.txt")
    statuses = {name: entry["status"] for name, entry in result["stages"].items()}
    assert statuses == {
        "train_compiled": "done",
        "sample": "done",
        "eval": "failed",
        "draft": "timeout",
        "llamagen": "skipped",
    }
    assert "--budget-s" in result["stages"]["llamagen"]["reason"]
    assert "exit 3" in result["stages"]["eval"]["notes"][0]
    assert result["elapsed_s"] < 30  # the sleeping stage was stopped, not waited for
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"benchmark", "device", "budget_s", "log", "stages", "targets", "elapsed_s"} <= set(on_disk)
    for row in on_disk["targets"]:
        assert set(row) == {"measure", "target", "value", "met"}
    compiled = next(r for r in on_disk["targets"] if r["measure"] == "compiled images/s, ntp, batch 128")
    assert compiled["value"] == 2400.0 and compiled["met"] is True
    log = (tmp_path / "log.txt").read_text()
    assert "======== stage eval" in log and "SystemExit(3)" in log


def test_skip_reason_names_what_is_missing_before_the_budget(monkeypatch):
    stage = Stage("x", "x", 50, lambda out: [], needs=lambda: "LLAMAGEN_REF is not set")
    assert skip_reason(stage, 1000) == "LLAMAGEN_REF is not set"
    assert "needs about 50 s, 49 s" in skip_reason(Stage("y", "y", 50, lambda out: []), 49.2)
    assert skip_reason(Stage("z", "z", 50, lambda out: []), 50) is None
    monkeypatch.delenv("LLAMAGEN_REF", raising=False)
    assert "LLAMAGEN_REF" in gpu_check.needs_llamagen()


def test_targets_met_missed_and_not_measured():
    def stage(data):
        return {"status": "done", "seconds": 100.0, "data": data}

    rows = lambda *r: {"rows": list(r)}  # noqa: E731
    result = {
        "stages": {
            "tier": stage({"counts": {"tests": 3, "passed": 3, "failed": 0, "errors": 0, "skipped": 0}}),
            "train_eager": stage(
                {
                    "eager": rows(
                        {"variant": "mutor2d:80+flex", "ratio_over_ideal": 1.11, "step_s": 0.17},
                        {"variant": "mutor2d:80+flex+chunk8192", "ratio_over_ideal": 1.10, "step_s": 0.17},
                    )
                }
            ),
            "eval": stage({"eval_pipeline": {"ratio": 0.85}}),
            "llamagen": {"status": "skipped", "reason": "LLAMAGEN_REF is not set"},
        }
    }
    found = {row["measure"]: row for row in targets(result)}
    assert found["GPU tier"]["met"] is True
    assert found["MuToR-2D R=80 / NTP step per ideal, eager"] == {
        "measure": "MuToR-2D R=80 / NTP step per ideal, eager", "target": "<= 1.05", "value": 1.11, "met": False,
    }  # fmt: skip
    assert found["eval/fid.py end to end / raw sampling"]["met"] is True
    assert found["head_chunk_size 8192 / 0 step time, MuToR-2D, eager"]["met"] is True
    assert found["sampling batch 32: ours compiled / LlamaGen compiled"]["met"] is None
    assert found["compiled training graph breaks"]["value"] is None
    assert "not measured" in gpu_check.table(targets(result))


def test_tier_counts_from_junit_xml(tmp_path):
    (tmp_path / "tier.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs CUDA"/></testcase><testcase classname="t" name="d"/>'
        "</testsuite></testsuites>"
    )
    tier = read_tier(tmp_path)
    assert tier["counts"] == {"tests": 4, "failed": 1, "errors": 0, "skipped": 1, "passed": 2}
    assert tier["failed"][0]["message"] == "boom" and tier["skipped"][0]["reason"] == "needs CUDA"
    assert read_tier(tmp_path / "missing")["counts"] is None


def test_stage_selection_and_device_names():
    assert [s.name for s in select("sample,tier")] == ["sample", "tier"]
    with pytest.raises(SystemExit, match="unknown stage"):
        select("tier,nope")
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_train_step_variant_options_set_attention_and_head_chunk(tmp_path):
    # The variants the check's training stages ask for, on a tiny CPU model (fp32, sdpa).
    out = tmp_path / "train_step.json"
    command = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--n-layer", "1", "--dim", "32",
               "--vocab-size", "16", "--grid-size", "4", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
               "--chain", "2", "--variants", "ntp,mutor2d:4+sdpa,ntp+chunk8,mutor2d:4+sdpa+chunk8",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert result["model"]["n_layer"] == 1 and result["model"]["num_tokens"] == 16
    for row in rows.values():
        assert row["chain"] == 2 and row["step_s_isolated"] > 0 and row["prepare_host_ms"] >= 0
    assert rows["mutor2d:4+sdpa+chunk8"]["head_chunk_size"] == 8
    assert rows["mutor2d:4+sdpa+chunk8"]["attention"] == "sdpa"
    assert rows["mutor2d:4+sdpa+chunk8"]["baseline"] == "ntp+chunk8"  # against next-token with the same chunk
    assert rows["mutor2d:4+sdpa"]["baseline"] == "ntp"
    bad = subprocess.run([*command[:-4], "--variants", "ntp+fast"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown option 'fast'" in bad.stderr
    # The compiled stage times chained steps and runs the split sdpa path beside flex.
    (compiled,) = gpu_check.train_compiled_commands(tmp_path)
    assert "mutor2d:80+sdpa" in compiled[compiled.index("--variants") + 1].split(",")
    assert compiled[compiled.index("--chain") + 1] == "3"


def test_the_sample_stage_runs_on_a_tiny_cpu_model(tmp_path):
    # The stage's command on a tiny model at two batch sizes (the CPU samples eager and the rows say
    # so): the compiled decode at every batch size, k steps per graph at B only, with its speed-up
    # over one step per graph.
    (command,) = gpu_check.sample_commands(tmp_path)
    assert "--compile" in command and command[command.index("--steps-per-graph") + 1] == "4@64"
    out = tmp_path / "sample.json"
    command = [sys.executable, str(ROOT / "bench" / "sample.py"), "--grid-size", "4", "--batch-size", "2,3",
               "--variants", "cache_cfg", "--repeats", "1", "--warmup", "0", "--out", str(out),
               "--compile", "--steps-per-graph", "4@3,2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    expected = {"cache_cfg@2", "cache_cfg_compiled@2", "cache_cfg_compiled+steps2@2"}
    assert set(rows) == expected | {name.replace("@2", "@3") for name in expected} | {"cache_cfg_compiled+steps4@3"}
    assert rows["cache_cfg_compiled@3"]["compiled"] is False and rows["cache_cfg_compiled@3"]["batch_size"] == 3
    assert rows["cache_cfg_compiled+steps4@3"]["speedup_over_steps1"] > 0
    assert result["ratios"]["graph_over_eager_cfg@2"] > 0
    bad = subprocess.run([*command, "--variants", "cache"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown cache" in bad.stderr


def test_the_sampling_targets_read_the_compiled_rows():
    rows = {"cache_cfg_compiled@64": {"images_per_s": 300.0}}
    rows["cache_cfg_compiled+steps4@64"] = {"images_per_s": 270.0, "speedup_over_steps1": 0.9}
    result = {"stages": {"sample": {"status": "done", "seconds": 1.0, "data": {"compiled_sampling": {"rows": rows}}}}}
    found = {row["measure"]: row for row in targets(result)}
    assert found["compiled sampling images/s, batch 64 (H100)"]["met"] is True
    assert found["compiled sampling images/s, batch 64, 4 steps/graph"]["met"] is False
    assert found["compiled sampling, batch 64: 4 / 1 steps per graph"]["value"] == 0.9
    assert found["eval/fid.py end to end / raw sampling"]["met"] is None
