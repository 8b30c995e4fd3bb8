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

A second campaign loses a whole machine (``--faults`` with the ``machine_`` faults, written to its own
file): two loopback "machines" of one CPU process each (``python -m mutor_vision.launch
--num_machines 2``, as on a cluster), and one of them killed with SIGKILL —
its launcher and every process below it, as when a node goes down (machine 0, which serves the
job's store, and machine 1 in turn):

- ``machine_training``: at a random step of training;
- ``machine_save``: while a checkpoint is being written (its temporary folder exists);
- ``machine_eval_sampling``: ``eval/fid.py`` once a random number of PNGs exist;
- ``machine_eval_metrics``: ``eval/fid.py`` once every PNG exists (the gather, the metrics, the writes).

Each records the survivor's exit code, its seconds from the kill to its exit, its last line and
whether it printed a traceback; then the same command runs again on both machines (training with
``--resume auto``) and must end equal to an uninterrupted two-machine run: the same weights byte for
byte, the same PNGs and the same metrics.

Outcomes are counted per fault; any other outcome than the expected one is listed with its details.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from pathlib import Path

import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mutor_vision.cli import EXIT_PEER_LOST  # noqa: E402
from mutor_vision.data import token_loader  # noqa: E402
from mutor_vision.processes import cpu_child_env, cpu_ranks_command, free_port  # noqa: E402
from mutor_vision.shards import ShardError, write_synthetic_shards  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager  # noqa: E402

TINY = ROOT / "configs" / "c2i" / "tiny_cpu.yaml"
EVAL_SAMPLES = 160
LONG = 10  # double_launch: a run this many times --steps, so the second launch starts while it runs
STOP_WITHIN_S = 30  # a survivor must stop this soon after its peer machine was lost


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


def machine_cmd(machine: int, port: int, args: list[str]) -> list[str]:
    """Machine ``machine`` of a two-machine job of one CPU process each, on loopback, as on a cluster."""
    launch = [sys.executable, "-m", "mutor_vision.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2"]
    launch += ["--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return [*launch, "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torch's agent starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(root: int) -> None:
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Job:
    """Two loopback machines running ``args``; each one's stderr kept as (time, line), its end timed."""

    def __init__(self, args: list[str]) -> None:
        port = free_port()
        self.procs = [start(machine_cmd(machine, port, args)) for machine in range(2)]
        self.lines: list[list[tuple[float, str]]] = [[], []]
        self.ended: list[float | None] = [None, None]
        for machine in range(2):  # a full pipe would stall a machine: read both all the time
            threading.Thread(target=self._read, args=(machine,), daemon=True).start()

    def _read(self, machine: int) -> None:
        proc = self.procs[machine]
        for line in proc.stderr:
            self.lines[machine].append((time.monotonic(), line))
        proc.wait()
        self.ended[machine] = time.monotonic()

    def logged(self, text: str) -> bool:
        return any(text in line for machine in self.lines for _, line in list(machine))

    def running(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300) -> bool:
        """Poll ``condition`` every half millisecond; False once a machine ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            if condition():
                return True
            time.sleep(0.0005)
        return False

    def kill(self, machine: int) -> float:
        """SIGKILL machine ``machine``'s launcher and everything below it (a node gone); the moment."""
        kill_tree(self.procs[machine].pid)
        return time.monotonic()

    def finish(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and None in self.ended:
            time.sleep(0.05)
        for machine, proc in enumerate(self.procs):
            if self.ended[machine] is None:
                kill_tree(proc.pid)
                proc.wait()
        return [-999 if end is None else proc.returncode for proc, end in zip(self.procs, self.ended, strict=True)]

    def stderr(self, machine: int) -> str:
        return "".join(line for _, line in self.lines[machine])


def run_job(args: list[str], timeout: float = 300) -> list[int]:
    return Job(args).finish(timeout)


def last_line(text: str) -> str:
    """The last line a terminal would show (progress bars redraw with carriage returns)."""
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    return next((line for line in reversed(lines) if line), "")


def survivor_record(job: Job, victim: int, killed_at: float, command: str, complete: Callable[[], bool]) -> dict:
    """What the machine that was not killed did: its exit code, seconds to stop, last line, traceback.
    ``complete`` says whether the command's final output exists (an exit 0 must have written it)."""
    survivor = 1 - victim
    code = job.finish()[survivor]
    text = job.stderr(survivor)
    record = {
        "killed_machine": victim,
        "survivor_exit": code,
        "survivor_stop_s": None if job.ended[survivor] is None else round(job.ended[survivor] - killed_at, 2),
        "survivor_last_line": last_line(text)[:400],
        "survivor_traceback": "Traceback" in text,
    }
    one_line = record["survivor_last_line"].startswith(f"{command}: ") and not record["survivor_traceback"]
    in_time = record["survivor_stop_s"] is not None and record["survivor_stop_s"] <= STOP_WITHIN_S
    if code == 0 and in_time and not record["survivor_traceback"] and complete():
        # the lost machine's share was done (it waited at the end): the survivor wrote the final output
        return {**record, "survivor": f"exit 0 within {STOP_WITHIN_S} s, its work complete"}
    if code == EXIT_PEER_LOST and one_line and in_time:
        return {**record, "survivor": f"exit {EXIT_PEER_LOST} in one line within {STOP_WITHIN_S} s"}
    return {**record, "survivor": f"exit {code}, traceback {record['survivor_traceback']}, BAD"}


def machine_train_args(shards: Path, run: Path, steps: int) -> list[str]:
    return train_cmd(shards, run, steps, "save_every=2", "keep_last=1")[1:]  # no interpreter: the launcher runs it


def trial_machine_training(
    work: Path, shards: Path, reference: bytes, rng: random.Random, steps: int, save: bool, victim: int
) -> dict:
    run = work / f"machine-{'save' if save else 'train'}-{rng.randrange(10**9)}"
    args = machine_train_args(shards, run, steps)
    step = rng.randrange(2, steps - 2)
    job = Job(args)
    if save:  # a save of a random step is under way: its temporary folder exists (checkpoints.py)
        step += step % 2  # saves every 2 steps
        partial = run / "checkpoints" / f".step_{step:08d}.tmp"
        struck = job.wait_until(partial.exists)
    else:
        struck = job.wait_until(lambda: job.logged(f"step {step}:"))
    delay = rng.uniform(0.0, 0.01 if save else 0.05)
    time.sleep(delay)
    if not struck or not job.running():
        job.finish()
        return {"step": step, "outcome": "the job ended before the strike"}
    final = run / "checkpoints" / f"step_{steps:08d}" / "export" / "model.safetensors"
    record = {
        "step": step,
        "delay_s": round(delay, 4),
        **survivor_record(job, victim, job.kill(victim), "train_c2i", final.exists),
    }
    record["resume_exits"] = run_job([*args, "--resume", "auto"])
    if record["resume_exits"] != [0, 0]:
        return {**record, "outcome": f"survivor: {record['survivor']}; resume FAILED"}
    record["leftovers"] = leftovers(run)
    same = not record["leftovers"] and export_bytes(run, steps) == reference
    resumed = "resumed identical to uninterrupted" if same else "resumed DIFFERENT or files left"
    return {**record, "outcome": f"survivor: {record['survivor']}; {resumed}"}


def eval_outputs(out: Path) -> tuple[dict[str, bytes], dict]:
    pngs = {p.name: p.read_bytes() for p in sorted((out / "samples").glob("*.png"))}
    metrics = json.loads((out / "results.json").read_text())["metrics"] if (out / "results.json").exists() else {}
    return pngs, metrics


def trial_machine_eval(
    work: Path, args: list[str], reference: Path, rng: random.Random, metrics: bool, victim: int
) -> dict:
    out = work / f"machine-eval-{rng.randrange(10**9)}"
    command = [*args, "--out", str(out)]
    target = EVAL_SAMPLES if metrics else rng.randrange(1, EVAL_SAMPLES - 8)
    job = Job(command)
    written = lambda: (out / "samples").is_dir() and len(list((out / "samples").glob("*.png"))) >= target  # noqa: E731
    struck = job.wait_until(written)
    delay = rng.uniform(0.0, 0.2 if metrics else 0.02)
    time.sleep(delay)
    if not struck or not job.running():
        job.finish()
        return {"pngs": target, "outcome": "the job ended before the strike"}
    record = {
        "pngs": target,
        "delay_s": round(delay, 4),
        **survivor_record(job, victim, job.kill(victim), "eval/fid.py", (out / "results.json").exists),
    }
    record["rerun_exits"] = run_job(command)
    if record["rerun_exits"] != [0, 0]:
        return {**record, "outcome": f"survivor: {record['survivor']}; rerun FAILED"}
    same = eval_outputs(out) == eval_outputs(reference)
    rerun = "rerun: every PNG and metric equal to uninterrupted" if same else "rerun DIFFERENT"
    return {**record, "outcome": f"survivor: {record['survivor']}; {rerun}"}


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
        for name, extra, ranks, steps, needed in [
            ("loader", ["save_every=10", "data.num_workers=2"], 1, args.steps, ("sigterm_group",)),
            (
                "saves",
                ["save_every=2", "keep_last=1"],
                1,
                args.steps,
                ("sigkill", "truncated_newest", "disk_full_save"),
            ),
            ("two_ranks", ["save_every=10", "data.num_workers=2"], 2, args.steps, ("sigterm_launcher_2ranks",)),
            ("long", ["save_every=2", "keep_last=1"], 1, LONG * args.steps, ("double_launch",)),
        ]:
            if not set(needed) & set(faults):
                continue
            run = work / f"reference-{name}"
            assert finish(start(train_cmd(shards, run, steps, *extra, ranks=ranks))) == 0, name
            references[name] = export_bytes(run, steps)
        if {"machine_training", "machine_save"} & set(faults):
            run = work / "reference-machines"
            assert run_job(machine_train_args(shards, run, args.steps)) == [0, 0], "two-machine reference"
            references["machines"] = export_bytes(run, args.steps)
        for fault in faults:
            slow = ("sigterm_launcher_2ranks", "eval_sigkill", "double_launch", "disk_full_eval")
            trials = max(1, args.trials // 3) if fault in slow else args.trials
            rows = []
            if "eval" in fault and not (work / "eval-reference").is_dir():
                eval_args, _ = eval_fixture(work)
                assert finish(start([sys.executable, *eval_args, "--out", str(work / "eval-reference")])) == 0
            if fault.startswith("machine_eval") and not (work / "eval-reference-machines").is_dir():
                assert run_job([*eval_args, "--out", str(work / "eval-reference-machines")]) == [0, 0]
            for trial in range(trials):
                victim = trial % 2  # the machine lost: the store's host and the other, in turn
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
                elif fault in ("machine_training", "machine_save"):
                    save_fault = fault == "machine_save"
                    rows.append(
                        trial_machine_training(
                            work, shards, references["machines"], rng, args.steps, save_fault, victim
                        )
                    )
                elif fault in ("machine_eval_sampling", "machine_eval_metrics"):
                    reference = work / "eval-reference-machines"
                    rows.append(
                        trial_machine_eval(work, eval_args, reference, rng, fault == "machine_eval_metrics", victim)
                    )
                else:
                    parser.error(f"--faults: unknown fault {fault!r}")
                print(fault, rows[-1], flush=True)
            results[fault] = rows
    summary = {fault: dict(Counter(r["outcome"] for r in rows)) for fault, rows in results.items()}
    report = {
        **provenance("faults", "cpu"),
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "trials": results,
    }
    stops = {
        fault: [r["survivor_stop_s"] for r in rows if r.get("survivor_stop_s") is not None]
        for fault, rows in results.items()
    }
    if any(stops.values()):  # the machine faults: how long a survivor took to stop, at most
        report["slowest_stop_s"] = {fault: max(values) for fault, values in stops.items() if values}
    print(json.dumps(summary, indent=2))
    save(args.out, report)


if __name__ == "__main__":
    main()
