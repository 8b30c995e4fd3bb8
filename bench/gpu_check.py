"""One command that checks every CUDA path and measures the GPU targets (``make gpu-check``).

    make gpu-check                                   # = python bench/gpu_check.py
    make gpu-check PY=python3                        # packages installed system-wide, no .venv
    python bench/gpu_check.py --budget-s 300 --stages tier,train_eager
    LLAMAGEN_REF=DIR make gpu-check                  # + LlamaGen's own code side by side (stage llamagen)
    python bench/gpu_check.py --dry-run              # what it would run (also what it does without CUDA)

Stages, in order, each in its own process (a crash or a hang in one costs only that stage):

  tier           the GPU test tier (pytest -m gpu): pass / fail / skip counts and its time
  train_eager    GPT-B training step, bf16, batch 128: next-token vs MuToR-2D R=80, flex vs sdpa,
                 head_chunk_size 0 vs 8192; images/s, step ratio over the ideal (N+R)/N, peak memory
  train_compiled the same compiled (next-token, MuToR-2D R=80): + graph breaks and recompiles
  sample         GPT-B compiled sampling (CUDA graphs, flex decode attention), CFG 2.0, bf16, batch 32
                 and 64 in one process, and at batch 64 with 4 decode steps per CUDA graph
                 (bench/decode_variants.py), each profiled at batch 64 (GPU time per step against wall
                 time, top kernels)
  eval           eval/fid.py's pipeline on 1,000 samples end to end vs raw sampling
  draft          register drafting at batch 1, 8, 64, greedy and sampled, CFG 2.0, on the demo's
                 MuToR-2D model (make demo; its rows are skipped without it), and the verify cost at GPT-B
  llamagen       with LLAMAGEN_REF=DIR: bench/vs_llamagen.py (LlamaGen's generate and train step)
  train_compiled_chunked  the compiled step with head_chunk_size 8192

After every stage the whole result is rewritten to ``bench/results/gpu_check_<device>.json``
(device, torch, commit, command, each stage's status, seconds and rows), so a run cut short keeps
what it measured. ``--budget-s`` bounds the wall time: a stage whose estimate no longer fits is
skipped and named, and a running stage is stopped when the budget runs out. The run ends with one
table: each target, its value, met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import commit  # bench/common.py (the script's folder is on the path)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEMO_EXPORT = ROOT / "runs" / "demo" / "mutor2d-seed0" / "checkpoints" / "step_00000600" / "export"
SCHEMA = 1


@dataclass
class Stage:
    """One stage: the commands it runs (each given a JSON path to write) and how to read their results."""

    name: str
    what: str
    estimate_s: float  # wall seconds on one H100 from a bare machine (compilation included)
    commands: Callable[[Path], list[list[str]]]  # out folder -> argv lists, run in order
    needs: Callable[[], str | None] = lambda: None  # why the stage cannot run here (None: it can)
    read: Callable[[Path], dict] = field(default=lambda folder: read_jsons(folder))


def read_jsons(folder: Path) -> dict[str, Any]:
    """Every ``*.json`` a stage wrote, by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


# ---------------------------------------------------------------- the stages

B128 = ["--device", "cuda", "--dtype", "bf16", "--size", "GPT-B", "--batch-size", "128"]


def tier_commands(out: Path) -> list[list[str]]:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    command += [str(ROOT / "tests" / "test_gpu.py"), f"--junitxml={out / 'tier.xml'}"]
    try:  # the tier's time is mostly compilation, which runs on the CPUs: 6 workers share one GPU
        import xdist  # noqa: F401

        command += ["-n", "6"]
    except ImportError:
        pass
    return [command]


def read_tier(out: Path) -> dict[str, Any]:
    """Counts from pytest's JUnit XML: passed, failed, errors, skipped (with reasons), seconds."""
    report = out / "tier.xml"
    if not report.is_file():
        return {"counts": None, "note": "pytest wrote no report"}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            if child.tag in ("failure", "error"):
                failed.append({"test": name, "kind": child.tag, "message": (child.get("message") or "")[:2000]})
            elif child.tag == "skipped":
                skipped.append({"test": name, "reason": child.get("message", "")})
    total, failures, errors = int(suite.get("tests", 0)), int(suite.get("failures", 0)), int(suite.get("errors", 0))
    counts = {"tests": total, "failed": failures, "errors": errors, "skipped": len(skipped)}
    counts["passed"] = total - failures - errors - len(skipped)
    return {"counts": counts, "pytest_seconds": float(suite.get("time", 0)), "failed": failed, "skipped": skipped}


def train_eager_commands(out: Path) -> list[list[str]]:
    variants = "ntp,mutor2d:80+flex,mutor2d:80+sdpa,ntp+chunk8192,mutor2d:80+flex+chunk8192"
    return [python("train_step.py", *B128, "--variants", variants, "--repeats", "7", "--chain", "3", "--profile",
                   "--out", str(out / "eager.json"))]  # fmt: skip


def train_compiled_commands(out: Path, chunk: int = 0) -> list[list[str]]:
    # --chain 3: steps back to back as in training, where a step's host work (its register layout and
    # mask) overlaps the previous step's kernels; the isolated step is recorded too. Without chunking
    # the split SDPA path (causal kernel for the regular rows, masked rows for the registers) runs
    # against flex.
    suffix = f"+chunk{chunk}" if chunk else ""
    variants = f"ntp{suffix},mutor2d:80+flex{suffix}" + ("" if chunk else ",mutor2d:80+sdpa")
    return [python("train_step.py", *B128, "--compile", "--variants", variants, "--warmup", "3", "--repeats", "7",
                   "--chain", "3", "--profile", "--out", str(out / f"compiled_chunk{chunk}.json"))]  # fmt: skip


SAMPLE = ["--size", "GPT-B", "--dtype", "bf16", "--variants", "", "--warmup", "1", "--repeats", "3", "--profile"]


def sample_commands(out: Path) -> list[list[str]]:
    # One process, the compiled decode only (eager: bench/results/gpu_check_h100_20261127_s2.json), and
    # 4 decode steps per CUDA graph at batch 64 (its remainder reuses the single-step graph), all
    # profiled. k = 2 would add another ~30 s compile: bench/sample.py --steps-per-graph 2,4 alone.
    args = ["--batch-size", "32,64", "--compile", "--steps-per-graph", "4@64"]
    return [python("sample.py", *SAMPLE, *args, "--out", str(out / "compiled_sampling.json"))]


def eval_commands(out: Path) -> list[list[str]]:
    args = ["--size", "GPT-B", "--tokenizer", "vq16", "--batch-size", "125", "--num-samples", "1000", "--compile"]
    args += ["--serial-samples", "375"]  # the serial order's per-batch GPU times: 3 batches are enough
    return [python("eval_pipeline.py", *args, "--out", str(out / "eval_pipeline.json"))]


def draft_commands(out: Path) -> list[list[str]]:
    parts = "images,verify_cost" if DEMO_EXPORT.is_dir() else "verify_cost"
    args = ["--device", "cuda", "--parts", parts, "--batches", "1,8,64", "--cfg-scales", "2.0", "--repeats", "2"]
    return [python("speculative.py", *args, "--image-export", str(DEMO_EXPORT), "--out", str(out / "drafting.json"))]


def llamagen_commands(out: Path) -> list[list[str]]:
    return [python("vs_llamagen.py", "--llamagen", os.environ["LLAMAGEN_REF"], "--out", str(out / "vs_llamagen.json"))]


def needs_llamagen() -> str | None:
    ref = os.environ.get("LLAMAGEN_REF")
    if not ref:
        return "LLAMAGEN_REF is not set (a LlamaGen checkout: the folder holding autoregressive/)"
    if not (Path(ref) / "autoregressive" / "models" / "gpt.py").is_file():
        return f"LLAMAGEN_REF={ref} holds no autoregressive/models/gpt.py"
    return None


# Estimates: seconds the stage took on one H100 (bench/results/gpu_check_h100_20261127.json: train_eager 43
# (+25: the chained timings, the profiles), train_compiled 83 (+40: the sdpa variant's compile, the
# chained timings), train_compiled_chunked 91; gpu_check_h100_20261127_s2.json: tier 93 with 6 workers
# and 14 tests, eval 48, llamagen 163, draft 10 without the demo model), rounded up; tier has 20 tests
# since the decode attentions (+5 compiled, a guess of +30 s). sample 150: 114 s in
# gpu_check_h100_20261127_s3.json for sdpa and flex at two batch sizes; now flex alone, + 4 steps per
# graph at batch 64 (a guess: one graph of 4 unrolled steps, ~30 s to compile, and its profile).
# eval 60 = 48 + the serial run (375 samples), the decoder variants and the PNG rates, less what the
# overlap saves (an estimate until a run).
STAGES = [
    Stage("tier", "GPU test tier (pytest -m gpu)", 130, tier_commands, read=read_tier),
    Stage(
        "train_eager",
        "GPT-B train step, eager, 3 chained: NTP vs MuToR-2D R=80, flex/sdpa, chunk 0/8192, profiles",
        75,
        train_eager_commands,
    ),
    Stage(
        "train_compiled",
        "GPT-B train step, compiled, 3 chained: NTP vs MuToR-2D R=80, flex and split sdpa, profiles",
        130,
        train_compiled_commands,
    ),
    Stage(
        "sample",
        "GPT-B compiled sampling, CFG 2.0, batch 32/64, and 4 decode steps per graph at 64, profiles",
        150,
        sample_commands,
    ),
    Stage("eval", "eval/fid.py pipeline, 1,000 samples, vs raw sampling; per-part GPU time", 60, eval_commands),
    Stage("draft", "register drafting at batch 1/8/64 (demo model) and the GPT-B verify cost", 35, draft_commands),
    Stage(
        "llamagen", "LlamaGen's own generate and train step side by side", 170, llamagen_commands, needs=needs_llamagen
    ),
    Stage(
        "train_compiled_chunked",
        "GPT-B train step, compiled, head_chunk_size 8192",
        95,
        lambda out: train_compiled_commands(out, chunk=8192),
    ),
]


# ---------------------------------------------------------------- running


def stage_timeout(stage: Stage, budget_left: float) -> float:
    """A stage may overrun its estimate (cold caches, a slower machine) but never hold the run hostage."""
    return min(budget_left, max(2.5 * stage.estimate_s, stage.estimate_s + 60))


def run_stage(stage: Stage, out: Path, timeout_s: float, log: Path) -> dict[str, Any]:
    """Run the stage's commands in order within ``timeout_s``; status done / failed / timeout, and its data."""
    start = time.perf_counter()
    status, notes = "done", []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(BENCH), env.get("PYTHONPATH")]))
    with log.open("a") as sink:
        sink.write(f"\n======== stage {stage.name} (limit {timeout_s:.0f} s)\n")
        for command in stage.commands(out):
            left = timeout_s - (time.perf_counter() - start)
            sink.write(f"\n$ {' '.join(command)}\n")
            sink.flush()
            # Its own process group: at the limit, pytest's workers and accelerate's ranks stop with it.
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode = process.wait(timeout=max(left, 0))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = "timeout"
                notes.append(f"stopped at the stage's limit of {timeout_s:.0f} s: {' '.join(command[1:3])}")
                break
            if returncode != 0:
                status = "failed"
                notes.append(f"exit {returncode}: {' '.join(command[1:3])} (log: {log.name})")
    result = {"status": status, "seconds": time.perf_counter() - start, "data": stage.read(out)}
    if stage.name == "tier" and status == "failed" and result["data"].get("counts"):
        result["status"] = "done"  # pytest exits 1 when a test fails: the counts say so, the stage ran
    if notes:
        result["notes"] = notes
    return result


def skip_reason(stage: Stage, budget_left: float) -> str | None:
    """Why ``stage`` does not run now: what it needs, or an estimate beyond the budget left (None: it runs)."""
    missing = stage.needs()
    if missing:
        return missing
    if stage.estimate_s > budget_left:
        return f"needs about {stage.estimate_s:.0f} s, {max(budget_left, 0):.0f} s of --budget-s left"
    return None


def run_all(
    stages: list[Stage],
    budget_s: float,
    path: Path,
    header: dict[str, Any],
    log: Path,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Run ``stages`` in order within ``budget_s``, rewriting ``path`` after each; the final result.

    Every command's output goes to ``log`` (one file, each command headed by its command line)."""
    start = clock()
    result = {**header, "budget_s": budget_s, "log": str(log), "stages": {}}
    log.parent.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        left = budget_s - (clock() - start)
        reason = skip_reason(stage, left)
        if reason:
            result["stages"][stage.name] = {"status": "skipped", "reason": reason}
            print(f"[gpu-check] {stage.name}: skipped ({reason})", flush=True)
        else:
            print(f"[gpu-check] {stage.name}: {stage.what} (~{stage.estimate_s:.0f} s, {left:.0f} s left)", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                result["stages"][stage.name] = run_stage(stage, Path(tmp), stage_timeout(stage, left), log)
            entry = result["stages"][stage.name]
            print(f"[gpu-check] {stage.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        result["elapsed_s"] = clock() - start
        result["targets"] = targets(result)
        write_json(path, result)
    return result


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file, and a run killed mid-write keeps the previous stage's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- the targets


def _stage_data(result: dict, stage: str) -> dict:
    entry = result["stages"].get(stage, {})
    return entry.get("data", {}) if entry.get("status") in ("done", "failed", "timeout") else {}


def _rows(result: dict, stage: str, file: str) -> dict[str, dict]:
    return {row["variant"]: row for row in _stage_data(result, stage).get(file, {}).get("rows", [])}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: measure, target, value (None: not measured), met (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def add(measure: str, target: str, value: float | str | None, met: bool | None) -> None:
        rows.append({"measure": measure, "target": target, "value": value, "met": None if value is None else met})

    tier = _stage_data(result, "tier")
    counts, seconds = tier.get("counts"), result["stages"].get("tier", {}).get("seconds")
    if counts:
        value = f"{counts['passed']} passed, {counts['failed'] + counts['errors']} failed, {counts['skipped']} skipped"
        green = counts["failed"] == counts["errors"] == counts["skipped"] == 0 and counts["passed"] > 0
        add("GPU tier", "all green in <= 300 s", f"{value}, {seconds:.0f} s", green and seconds <= 300)
    else:
        add("GPU tier", "all green in <= 300 s", None, None)

    for mode, stage, file in [("eager", "train_eager", "eager"), ("compiled", "train_compiled", "compiled_chunk0")]:
        found = _rows(result, stage, file)
        mutor = found.get("mutor2d:80+flex")
        value = None if mutor is None else round(mutor["ratio_over_ideal"], 3)
        add(f"MuToR-2D R=80 / NTP step per ideal, {mode}", "<= 1.05", value, value is not None and value <= 1.05)
    split = _rows(result, "train_compiled", "compiled_chunk0").get("mutor2d:80+sdpa")
    value = None if split is None else round(split["ratio_over_ideal"], 3)
    met = value is not None and value <= 1.05
    add("MuToR-2D R=80 / NTP step per ideal, compiled, split sdpa", "<= 1.05", value, met)
    compiled = _rows(result, "train_compiled", "compiled_chunk0")
    for variant, goal in [("ntp", 2300), ("mutor2d:80+flex", 1600)]:
        row = compiled.get(variant)
        value = None if row is None else round(row["images_per_s"], 1)
        add(f"compiled images/s, {variant}, batch 128", f">= {goal}", value, value is not None and value >= goal)
    if compiled:
        breaks = sum(row.get("graph_breaks", 0) for row in compiled.values())
        recompiles = max(row.get("recompiles", 0) for row in compiled.values())
        add("compiled training graph breaks", "0", breaks, breaks == 0)
        add("compiled training recompiles (per model)", "<= 1", recompiles, recompiles <= 1)
    else:
        add("compiled training graph breaks", "0", None, None)
        add("compiled training recompiles (per model)", "<= 1", None, None)

    for mode, stage, file in [("eager", "train_eager", "eager"), ("compiled", "train_compiled_chunked", "")]:
        if mode == "eager":
            found = _rows(result, stage, file)
            chunked, whole = found.get("mutor2d:80+flex+chunk8192"), found.get("mutor2d:80+flex")
        else:
            chunked = _rows(result, stage, "compiled_chunk8192").get("mutor2d:80+flex+chunk8192")
            whole = compiled.get("mutor2d:80+flex")
        value = None if not (chunked and whole) else round(chunked["step_s"] / whole["step_s"], 3)
        add(f"head_chunk_size 8192 / 0 step time, MuToR-2D, {mode}", "<= 1.02 (no slower)", value,
            value is not None and value <= 1.02)  # fmt: skip

    llamagen = _stage_data(result, "llamagen").get("vs_llamagen", {}).get("sampling", {})
    for batch in (32, 64):
        row = llamagen.get(f"batch_{batch}")
        value = None if row is None else round(row["ours_compiled_over_llamagen_compiled"], 3)
        add(
            f"sampling batch {batch}: ours compiled / LlamaGen compiled",
            ">= 1.5",
            value,
            value is not None and value >= 1.5,
        )

    # Without the llamagen stage: LlamaGen's compiled generate ran 188 images/s at batch 64 on the H100
    # (bench/results/vs_llamagen_h100.json), so 1.5x is 282 (0.9 ms per decode step).
    decode = _stage_data(result, "sample").get("compiled_sampling", {}).get("rows", {})
    row = decode.get("cache_cfg_compiled@64")
    value = None if row is None else round(row["images_per_s"], 1)
    add("compiled sampling images/s, batch 64 (H100)", ">= 282", value, value is not None and value >= 282)
    row = decode.get("cache_cfg_compiled+steps4@64")
    value = None if row is None else round(row["images_per_s"], 1)
    add("compiled sampling images/s, batch 64, 4 steps/graph", ">= 282", value, value is not None and value >= 282)
    value = None if row is None or "speedup_over_steps1" not in row else round(row["speedup_over_steps1"], 3)
    add("compiled sampling, batch 64: 4 / 1 steps per graph", "> 1", value, value is not None and value > 1)

    pipeline = _stage_data(result, "eval").get("eval_pipeline")
    value = None if pipeline is None else round(pipeline["ratio"], 3)
    add("eval/fid.py end to end / raw sampling", ">= 0.8", value, value is not None and value >= 0.8)
    # What the pipeline itself controls: the GPU kept busy while sampling, VQ decode and Inception share it
    # (the ratio above also counts the decode's and Inception's own GPU time, docs/evaluation.md).
    overlapped = (pipeline or {}).get("breakdown", {}).get("end_to_end", {})
    busy, wall = overlapped.get("gpu_timeline", {}).get("busy_s"), overlapped.get("wall_s")
    value = None if not (busy and wall) else round(busy / wall, 3)
    add("eval/fid.py: GPU busy share of its wall time", ">= 0.9", value, value is not None and value >= 0.9)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'measure':<58} {'target':<22} {'value':<40} met", "-" * 128]
    for row in rows:
        met = {True: "yes", False: "NO", None: "not measured"}[row["met"]]
        value = "-" if row["value"] is None else str(row["value"])
        lines.append(f"{row['measure']:<58} {row['target']:<22} {value:<40} {met}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the file name's device part."""
    match = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (match.group(1) if match else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def select(names: str | None) -> list[Stage]:
    if not names:
        return list(STAGES)
    known = {stage.name: stage for stage in STAGES}
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return [known[n] for n in names.split(",")]


def describe(stages: list[Stage], budget_s: float) -> str:
    lines = [f"gpu-check: {len(stages)} stages within --budget-s {budget_s:.0f}:"]
    for stage in stages:
        missing = stage.needs()
        lines.append(
            f"  {stage.name:<24} ~{stage.estimate_s:>4.0f} s  {stage.what}"
            + (f"  [skip: {missing}]" if missing else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=480, help="wall-time limit (default 480 = 8 minutes)")
    parser.add_argument("--stages", default=None, help="comma-separated subset, in the given order (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/gpu_check_<device>.json")
    parser.add_argument("--log", type=Path, default=ROOT / "runs" / "gpu_check.log", help="every command's output")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and exit")
    args = parser.parse_args(argv)
    stages = select(args.stages)
    print(describe(stages, args.budget_s))
    if args.dry_run:
        return 0
    import torch  # after the plan is printed: importing torch takes seconds

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here: nothing run (the stages above need one)")
        return 0
    name = torch.cuda.get_device_name()
    path = args.out or BENCH / "results" / f"gpu_check_{device_slug(name)}.json"
    header = {
        "benchmark": "gpu_check",
        "schema": SCHEMA,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "commit": commit(),
        "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.log.unlink(missing_ok=True)
    result = run_all(stages, args.budget_s, path, header, args.log)
    print(table(result["targets"]))
    print(f"gpu-check: {path} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
