"""Fault injection at random moments: does every interrupted run resume to the uninterrupted result?

    python bench/faults.py --trials 10 --out bench/results/faults_cpu.json

Each trial starts a real command in its own process group, strikes at a random step (plus a
random few milliseconds, so saves and deletions are hit mid-way too), lets it finish or resumes it
with ``--resume auto``, and compares the final export with an uninterrupted run byte for byte (CPU,
fp32, the tiny config). The faults:

- ``sigterm_group``: SIGTERM to the whole process group, 2 loader workers (a scheduler's preemption);
- ``sigterm_launcher_2ranks``: SIGTERM to ``accelerate launch`` only, 2 CPU ranks (torch elastic);
- ``sigkill``: SIGKILL of the group, with a save and a prune every 2 steps (a node lost at any moment);
- ``truncated_newest``: a random file of the newest checkpoint cut to a random length, then ``--resume auto``;
- ``short_shard``: one shard cut at a random member boundary (the loader must refuse, or skip it);
- ``eval_sigkill``: ``eval/fid.py`` killed at a random moment and rerun; every PNG must equal the
  uninterrupted run's;
- ``double_launch``: the same training command started again with ``--resume auto`` at a random step
  while the first runs (a requeued job): the second must be refused (exit 2, naming the holder) and
  the first must finish unharmed;
- ``disk_full_save``: training under a random file-size limit (``RLIMIT_FSIZE``, below the largest
  checkpoint file), so some save fails: exit 5, no partial folder left; the rerun without the limit
  must end identical to an uninterrupted run;
- ``disk_full_eval``: ``eval/fid.py`` (with its ``samples.npz``) under a random file-size limit:
  exit 5; the rerun without it must fill in every PNG identical to an uninterrupted run's.

Outcomes are counted per fault; any other outcome than the expected one is listed with its details.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mutor_vision.data import token_loader  # noqa: E402
from mutor_vision.processes import cpu_child_env, cpu_ranks_command  # noqa: E402
from mutor_vision.shards import ShardError, write_synthetic_shards  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager  # noqa: E402

TINY = ROOT / "configs" / "c2i" / "tiny_cpu.yaml"
EVAL_SAMPLES = 160
LONG = 10  # double_launch: a run this many times --steps, so the second launch starts while it runs


def env() -> dict[str, str]:
    return cpu_child_env(ROOT)


def train_cmd(shards: Path, run: Path, steps: int, *extra: str, ranks: int = 1) -> list[str]:
    cmd = cpu_ranks_command(2) if ranks == 2 else [sys.executable]
    cmd += ["train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={run}", f"steps={steps}"]
    return [*cmd, "log_every=1", "tensorboard=false", *extra]


def start(cmd: list[str], file_size_limit: int | None = None) -> subprocess.Popen:
    """``cmd`` in its own process group; ``file_size_limit``: RLIMIT_FSIZE in bytes (a full disk, no root needed)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=limit if file_size_limit else None,
    )  # fmt: skip


def strike_at(proc: subprocess.Popen, step: int, delay: float, sig: signal.Signals, group: bool) -> bool:
    """Wait for the log line of ``step``, sleep ``delay``, send ``sig``; False if the run ended first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if f"step {step}:" in line:
            time.sleep(delay)
            try:
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            except ProcessLookupError:
                return False
            return True
        if not line and proc.poll() is not None:
            return False
    raise TimeoutError(f"step {step} never logged")


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -999
    return proc.returncode


def export_bytes(run: Path, step: int) -> bytes:
    return (run / "checkpoints" / f"step_{step:08d}" / "export" / "model.safetensors").read_bytes()


def leftovers(run: Path) -> list[str]:
    root = run / "checkpoints"
    complete = {p.name for p in CheckpointManager(root, 1).complete()}
    return sorted(p.name for p in root.iterdir() if p.name not in complete and not p.name.startswith("unreadable-"))


def resume_to_end(shards: Path, run: Path, steps: int, extra: list[str], ranks: int = 1) -> int:
    proc = start([*train_cmd(shards, run, steps, *extra, ranks=ranks), "--resume", "auto"])
    return finish(proc)


def trial_signal(work: Path, shards: Path, reference: bytes, rng: random.Random, fault: str, steps: int) -> dict:
    run = work / f"{fault}-{rng.randrange(10**9)}"
    ranks = 2 if fault == "sigterm_launcher_2ranks" else 1
    extra = ["save_every=2", "keep_last=1"] if fault == "sigkill" else ["save_every=10", "data.num_workers=2"]
    step, delay = rng.randrange(2, steps - 2), rng.uniform(0.0, 0.05)
    sig = signal.SIGKILL if fault == "sigkill" else signal.SIGTERM
    proc = start(train_cmd(shards, run, steps, *extra, ranks=ranks))
    struck = strike_at(proc, step, delay, sig, group=fault != "sigterm_launcher_2ranks")
    code = finish(proc)
    record: dict = {"step": step, "delay_s": round(delay, 4), "exit": code}
    if sig == signal.SIGTERM:
        latest = CheckpointManager(run / "checkpoints", 1).latest()
        state = json.loads((latest / "state.json").read_text()) if latest else {}
        record["saved"] = state.get("reason")
        if struck and state.get("reason") != "terminated":
            return {**record, "outcome": "no checkpoint saved on SIGTERM"}
    record["resume_exit"] = resume_to_end(shards, run, steps, extra, ranks)
    if record["resume_exit"] != 0:
        return {**record, "outcome": "resume failed"}
    record["leftovers"] = leftovers(run)
    if record["leftovers"]:
        return {**record, "outcome": "orphaned checkpoint files"}
    same = export_bytes(run, steps) == reference
    return {**record, "outcome": "resumed, identical to uninterrupted" if same else "resumed, DIFFERENT weights"}


def trial_truncated(work: Path, shards: Path, reference: bytes, rng: random.Random, steps: int) -> dict:
    run = work / f"truncated-{rng.randrange(10**9)}"
    half = steps // 2
    extra = ["save_every=2", "keep_last=3"]
    finish(start(train_cmd(shards, run, half, *extra)))
    files = sorted((run / "checkpoints" / f"step_{half:08d}" / "accelerate").rglob("*"))
    victim = rng.choice([f for f in files if f.is_file()])  # the training state (the export is not read back)
    data = victim.read_bytes()
    victim.write_bytes(data[: rng.randrange(len(data))])
    code = resume_to_end(shards, run, steps, [*extra, "--allow-change", "steps"])
    record = {"file": str(victim.relative_to(run)), "exit": code}
    if code != 0:
        return {**record, "outcome": "resume failed"}
    record["set_aside"] = (run / "checkpoints" / f"unreadable-step_{half:08d}").is_dir()
    if export_bytes(run, steps) != reference:
        return {**record, "outcome": "resumed, DIFFERENT weights"}
    if record["set_aside"]:
        return {**record, "outcome": "fell back to the previous checkpoint, identical to uninterrupted"}
    # accelerate skips an unreadable RNG-state file with a log line; every step here reseeds its draws.
    return {**record, "outcome": "resumed (RNG file skipped by accelerate), identical to uninterrupted"}


def trial_short_shard(work: Path, rng: random.Random) -> dict:
    root = work / f"short-{rng.randrange(10**9)}"
    manifest = write_synthetic_shards(root, num_shards=3, per_shard=6, grid=4, vocab_size=8, num_classes=2)
    shard = root / rng.choice(manifest.shards)
    with tarfile.open(shard) as archive:
        headers = [m.offset for m in archive.getmembers()][::2]  # each sample: tokens.npy + cls
    keep = rng.randrange(1, len(headers))
    shard.write_bytes(shard.read_bytes()[: headers[keep]])
    record = {"shard": shard.name, "samples_kept": keep}
    try:
        list(token_loader(root, 2, 40, seed=rng.randrange(1000), num_workers=0, shuffle_buffer=1))
    except ShardError as error:
        named = shard.name in str(error) and f"read {keep} samples" in str(error)
        skipped = len(list(token_loader(root, 2, 40, seed=0, num_workers=0, on_error="skip", shuffle_buffer=1)))
        ok = named and skipped == 40
        return {**record, "outcome": "refused naming the shard; skip mode continues" if ok else "wrong message"}
    return {**record, "outcome": "NOT DETECTED"}


def eval_fixture(work: Path) -> tuple[list[str], Path]:
    """A tiny export + palette + random-weight Inception; the eval command line without --out."""
    from mutor_vision.evaluation import INCEPTION_FILE, save_random_inception_weights
    from mutor_vision.models import GPT, GPTConfig, RegisterConfig
    from tokenizer import PaletteTokenizer

    root = work / "eval_fixture"
    torch.manual_seed(0)
    config = GPTConfig(size=None, n_layer=2, n_head=2, dim=64, vocab_size=6, num_classes=3, grid_size=8,
                       registers=RegisterConfig(mode="ntp"))  # fmt: skip
    model = GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    model.save_pretrained(root / "export")
    palette = PaletteTokenizer(torch.randint(0, 256, (6, 3)).numpy().astype("uint8"))
    palette.save(root / "palette.json")
    save_random_inception_weights(root / INCEPTION_FILE)
    args = ["eval/fid.py", "--ckpt", str(root / "export"), "--vq-ckpt", str(root / "palette.json")]
    args += ["--tokenizer", "palette", "--num-samples", str(EVAL_SAMPLES), "--batch-size", "8", "--cfg-scale", "1.5"]
    args += ["--inception-weights", str(root / INCEPTION_FILE), "--no-npz", "--no-reference", "--per-class"]
    return args, root


def trial_eval(work: Path, args: list[str], reference: Path, rng: random.Random) -> dict:
    out = work / f"eval-{rng.randrange(10**9)}"
    proc = start([sys.executable, *args, "--out", str(out)])
    # Strike once a random number of PNGs exist (plus a few ms): mid-batch, mid-write, anywhere.
    samples, deadline, target = out / "samples", time.monotonic() + 300, rng.randrange(1, EVAL_SAMPLES - 8)
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.is_dir() and len(list(samples.glob("*.png"))) >= target:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.02))
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    before = len(list((out / "samples").glob("*.png"))) if (out / "samples").is_dir() else 0
    code = finish(start([sys.executable, *args, "--out", str(out)]))
    names = sorted(p.name for p in (reference / "samples").glob("*.png"))
    same = code == 0 and all(
        (out / "samples" / n).read_bytes() == (reference / "samples" / n).read_bytes() for n in names
    )
    outcome = "rerun filled the gaps, every PNG identical" if same else "DIFFERENT or failed"
    return {"pngs_before_rerun": before, "exit": code, "outcome": outcome}


def trial_double_launch(work: Path, shards: Path, reference: bytes, rng: random.Random, steps: int) -> dict:
    run = work / f"double-{rng.randrange(10**9)}"
    extra = ["save_every=2", "keep_last=1"]
    step = rng.randrange(1, steps // 2)
    first = start(train_cmd(shards, run, steps, *extra))
    if not strike_at_step(first, step):
        return {"step": step, "outcome": "the first run ended before the second started"}
    # Keep reading the first run's log while the second runs: a full pipe would stall it.
    drained = threading.Thread(target=first.stderr.read, daemon=True)
    drained.start()
    began = time.monotonic()
    second = start([*train_cmd(shards, run, steps, *extra), "--resume", "auto"])
    _, message = second.communicate(timeout=300)
    record = {"step": step, "second_exit": second.returncode, "refused_after_s": round(time.monotonic() - began, 2)}
    try:
        record["first_exit"] = first.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        record["first_exit"] = -999
    drained.join(timeout=10)
    if second.returncode != 2 or "in use by another run" not in message:
        return {**record, "outcome": "second launch NOT refused", "message": message[-300:]}
    if record["first_exit"] != 0 or leftovers(run) or export_bytes(run, steps) != reference:
        return {**record, "outcome": "first run HARMED"}
    return {**record, "outcome": "second refused, first unharmed and identical to uninterrupted"}


def strike_at_step(proc: subprocess.Popen, step: int) -> bool:
    """Wait for the log line of ``step`` (the run is then past its start-up); False if it ended first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if f"step {step}:" in line:
            return True
        if not line and proc.poll() is not None:
            return False
    return False


def largest_checkpoint_file(run: Path) -> int:
    return max(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file())


def trial_disk_full_save(
    work: Path, shards: Path, reference: bytes, largest: int, rng: random.Random, steps: int
) -> dict:
    run = work / f"diskfull-{rng.randrange(10**9)}"
    extra = ["save_every=2", "keep_last=1"]
    limit = rng.randrange(4096, largest)
    proc = start(train_cmd(shards, run, steps, *extra), file_size_limit=limit)
    code = finish(proc)
    record: dict = {"limit_bytes": limit, "exit": code}
    if code != 5:
        return {**record, "outcome": f"exit {code}, not the storage fault's 5"}
    record["temp_left"] = sorted(p.name for p in (run / "checkpoints").glob(".*tmp*")) if run.is_dir() else []
    record["resume_exit"] = resume_to_end(shards, run, steps, extra)
    if record["temp_left"] or record["resume_exit"] != 0 or leftovers(run):
        return {**record, "outcome": "partial files left or resume failed"}
    same = export_bytes(run, steps) == reference
    return {**record, "outcome": "exit 5, rerun identical to uninterrupted" if same else "rerun DIFFERENT weights"}


def trial_disk_full_eval(work: Path, args: list[str], reference: Path, rng: random.Random) -> dict:
    out = work / f"evalfull-{rng.randrange(10**9)}"
    with_npz = [a for a in args if a != "--no-npz"]
    limit = rng.randrange(256, EVAL_SAMPLES * 8 * 8 * 3)  # below samples.npz's size: some write fails
    code = finish(start([sys.executable, *with_npz, "--out", str(out)], file_size_limit=limit))
    record = {"limit_bytes": limit, "exit": code}
    if code != 5:
        return {**record, "outcome": f"exit {code}, not the storage fault's 5"}
    record["rerun_exit"] = finish(start([sys.executable, *with_npz, "--out", str(out)]))
    names = sorted(p.name for p in (reference / "samples").glob("*.png"))
    same = record["rerun_exit"] == 0 and all(
        (out / "samples" / n).read_bytes() == (reference / "samples" / n).read_bytes() for n in names
    )
    return {**record, "outcome": "exit 5, rerun filled in every PNG identical" if same else "DIFFERENT or failed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per fault (two-rank faults: a third)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default="sigterm_group,sigterm_launcher_2ranks,sigkill,truncated_newest,"
                        "short_shard,eval_sigkill,double_launch,disk_full_save,disk_full_eval")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    faults = args.faults.split(",")
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = work / "shards"
        write_synthetic_shards(shards, num_shards=4, per_shard=32, grid=8, vocab_size=16, num_classes=10)
        references = {}
        for name, extra, ranks, steps in [
            ("loader", ["save_every=10", "data.num_workers=2"], 1, args.steps),
            ("saves", ["save_every=2", "keep_last=1"], 1, args.steps),
            ("two_ranks", ["save_every=10", "data.num_workers=2"], 2, args.steps),
            ("long", ["save_every=2", "keep_last=1"], 1, LONG * args.steps),
        ]:
            if (name == "two_ranks" and "sigterm_launcher_2ranks" not in faults) or (
                name == "long" and "double_launch" not in faults
            ):
                continue
            run = work / f"reference-{name}"
            assert finish(start(train_cmd(shards, run, steps, *extra, ranks=ranks))) == 0, name
            references[name] = export_bytes(run, steps)
        for fault in faults:
            slow = ("sigterm_launcher_2ranks", "eval_sigkill", "double_launch", "disk_full_eval")
            trials = max(1, args.trials // 3) if fault in slow else args.trials
            rows = []
            if fault in ("eval_sigkill", "disk_full_eval") and not (work / "eval-reference").is_dir():
                eval_args, _ = eval_fixture(work)
                assert finish(start([sys.executable, *eval_args, "--out", str(work / "eval-reference")])) == 0
            for _ in range(trials):
                if fault in ("sigterm_group", "sigkill", "sigterm_launcher_2ranks"):
                    key = {"sigterm_group": "loader", "sigkill": "saves", "sigterm_launcher_2ranks": "two_ranks"}[fault]
                    rows.append(trial_signal(work, shards, references[key], rng, fault, args.steps))
                elif fault == "truncated_newest":
                    rows.append(trial_truncated(work, shards, references["saves"], rng, args.steps))
                elif fault == "short_shard":
                    rows.append(trial_short_shard(work, rng))
                elif fault == "eval_sigkill":
                    rows.append(trial_eval(work, eval_args, work / "eval-reference", rng))
                elif fault == "double_launch":
                    rows.append(trial_double_launch(work, shards, references["long"], rng, LONG * args.steps))
                elif fault == "disk_full_save":
                    largest = largest_checkpoint_file(work / "reference-saves")
                    rows.append(trial_disk_full_save(work, shards, references["saves"], largest, rng, args.steps))
                elif fault == "disk_full_eval":
                    rows.append(trial_disk_full_eval(work, eval_args, work / "eval-reference", rng))
                print(fault, rows[-1], flush=True)
            results[fault] = rows
    summary = {fault: dict(Counter(r["outcome"] for r in rows)) for fault, rows in results.items()}
    report = {
        **provenance("faults", "cpu"),
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "trials": results,
    }
    print(json.dumps(summary, indent=2))
    save(args.out, report)


if __name__ == "__main__":
    main()
