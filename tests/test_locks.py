"""One run per output folder (mutor_vision/locks.py): refused while held, taken over once its holder is gone.

The end-to-end tests start the double launch that used to destroy a run (a second ``--resume auto``
on a running run's out_dir deleted its half-written checkpoint) and check the second is refused
within seconds while the first goes on unharmed; eval/fid.py and the encoder refuse the same way.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env, two_cpu_ranks
from test_eval import cli_args, export  # noqa: F401  (export: a module fixture, used by name)
from test_reliability import encode_args, shards, wait_for_line  # noqa: F401  (shards: a fixture)
from test_train import TINY, config

from eval import fid as fid_cli
from mutor_vision import locks
from mutor_vision.errors import ConfigError, StorageError
from mutor_vision.locks import LEASE_S, LOCK_NAME, acquire, new_record, pid_start_time
from mutor_vision.training.c2i import train
from mutor_vision.training.checkpoints import CheckpointManager
from tokenizer.encode_imagenet import main as encode_cli

ROOT = Path(__file__).resolve().parent.parent


def plant(folder: Path, **changes) -> dict:
    """Write a lock record of this process with ``changes``, as another holder would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {**new_record("elsewhere --config x.yaml"), **changes}
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def holder(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


# ---------------------------------------------------------------- the module


def test_acquire_refuse_release(tmp_path):
    folder = tmp_path / "run"
    with acquire(folder, "out_dir", renew=False) as lock:
        record = holder(folder)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["token"] == lock.token and {"started", "renewed", "pid_start", "command"} <= set(record)
        with pytest.raises(ConfigError) as refused:
            acquire(folder, "out_dir", renew=False)
        message = str(refused.value)
        assert f"out_dir {folder} is in use by another run" in message and "\n" not in message
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in message and "--force" in message
        assert holder(folder) == record  # the refused one changed nothing
    assert not folder.exists()  # created by the lock and left empty: removed with it
    (tmp_path / "kept").mkdir()
    with acquire(tmp_path / "kept", renew=False):
        (tmp_path / "kept" / "config.yaml").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["config.yaml"]


def test_a_dead_holder_on_this_machine_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is free
    plant(tmp_path, pid=gone.pid, pid_start=None)
    with acquire(tmp_path, "out_dir", renew=False) as lock:
        assert holder(tmp_path)["token"] == lock.token
    assert f"its process {gone.pid} is gone" in caplog.text


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    start = pid_start_time(os.getpid())
    if start is None:
        pytest.skip("no /proc: pid start times unknown")
    plant(tmp_path, pid_start=start + 1000)  # our pid, alive, but not the process that took the lock
    with acquire(tmp_path, renew=False) as lock:
        assert lock.held()
    assert f"pid {os.getpid()} now belongs to another process" in caplog.text


def test_another_machine_holds_until_its_lease_expires(tmp_path):
    plant(tmp_path, host="node-17", machine="other", pid=4242, renewed=time.time() - 60)
    with pytest.raises(ConfigError, match=r"host node-17, pid 4242, started .*--force"):
        acquire(tmp_path, "--out", renew=False)
    plant(tmp_path, host="node-17", machine="other", pid=4242, renewed=time.time() - LEASE_S - 1)
    with acquire(tmp_path, "--out", renew=False) as lock:
        assert holder(tmp_path)["token"] == lock.token


def test_force_takes_over_a_live_holder_which_then_lets_go(tmp_path, caplog):
    first = acquire(tmp_path, renew=False)
    second = acquire(tmp_path, force=True, renew=False)
    assert second.held() and not first.held()
    assert not first.renew() and "taken over by" in caplog.text  # the first stops renewing
    first.release()  # removes nothing that is not its own
    assert second.held()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lease_is_renewed_until_release(tmp_path):
    lock = acquire(tmp_path, renew=False)
    before = holder(tmp_path)["renewed"]
    lock.start_renewing(every_s=0.05)
    deadline = time.monotonic() + 10
    while holder(tmp_path)["renewed"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder(tmp_path)["renewed"] > before and holder(tmp_path)["token"] == lock.token
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and lock._thread is None


def test_an_unreadable_old_lock_file_and_a_left_guard_are_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "no')  # its writer died mid-write
    guard = tmp_path / f"{LOCK_NAME}.guard"
    guard.touch()  # left by a process killed while it held the guard
    old = time.time() - locks.GUARD_STALE_S - 10
    for path in (tmp_path / LOCK_NAME, guard):
        os.utime(path, (old, old))
    with acquire(tmp_path, renew=False) as lock:
        assert lock.held() and not guard.exists()


def test_a_full_disk_while_locking_is_a_storage_fault_leaving_no_lock_file(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "write", full)
    with pytest.raises(StorageError, match=r"out_dir .*: cannot write its lock file .*No space left"):
        acquire(tmp_path, "out_dir", renew=False)
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-folder", "stale-holder"])
def test_of_racing_acquirers_exactly_one_wins(tmp_path, stale):
    if stale:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        plant(tmp_path, pid=gone.pid, pid_start=None)
    racers, start = 8, threading.Barrier(8)
    won, refused, failed = [], [], []

    def race() -> None:
        start.wait()
        try:
            won.append(acquire(tmp_path, renew=False))
        except ConfigError as error:
            (refused if "is in use by another run" in str(error) else failed).append(str(error))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(won) == 1 and len(refused) == racers - 1 and not failed, failed
    assert won[0].held()
    won[0].release()


# ---------------------------------------------------------------- the commands


def test_a_second_training_on_a_running_out_dir_is_refused_and_the_first_is_unharmed(tmp_path, shards):  # noqa: F811
    run = tmp_path / "run"
    args = ["train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={run}", "save_every=5"]
    args += ["log_every=1", "tensorboard=false", "keep_last=100"]
    first = subprocess.Popen(
        [sys.executable, *args, "steps=100000"], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_line(first, "step 1:")
        began = time.monotonic()
        second = subprocess.run(
            [sys.executable, *args, "steps=100000", "--resume", "auto"], cwd=ROOT, env=child_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        refused_after = time.monotonic() - began
        assert first.poll() is None, "the first run died"
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("train_c2i: config error: out_dir ")
        assert f"pid {first.pid}, started " in line and "--force" in line
        assert refused_after < 60, refused_after  # the start-up of Python and torch; the check itself is instant
        wait_for_line(first, "step 12:")  # it goes on saving past the refusal
        first.send_signal(signal.SIGTERM)  # a clean stop: save, release the lock, exit 0
        _, err = first.communicate(timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    assert first.returncode == 0, err[-3000:]
    root = run / "checkpoints"
    saved = CheckpointManager(root, 1).complete()
    assert [p.name for p in saved[:2]] == ["step_00000005", "step_00000010"]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in saved]  # no abandoned-, .tmp or .trash
    assert not (run / LOCK_NAME).exists()
    step = json.loads((saved[-1] / "state.json").read_text())["step"]
    resumed = train(config(tmp_path, shards, f"steps={step + 1}", "save_every=5", "keep_last=100"), resume="auto",
                    allow_change=["steps"])  # fmt: skip
    assert resumed.step == step + 1  # the folder is free again and its checkpoints load


def test_a_second_training_on_two_ranks_is_refused_on_every_rank(tmp_path, shards):  # noqa: F811
    run = tmp_path / "run"
    with acquire(run, "out_dir", renew=False):
        result = subprocess.run(
            [*two_cpu_ranks(), "train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={run}",
             "tensorboard=false"],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert result.returncode != 0 and os.listdir(run) == [LOCK_NAME]
    assert result.stderr.count(f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}") == 2


def test_eval_refuses_an_out_folder_in_use(tmp_path, export, capsys):  # noqa: F811
    out = tmp_path / "eval"
    with acquire(out, "--out", renew=False) as lock:
        argv = cli_args(export, out, Path("unused"))
        argv[argv.index("--inception-weights") + 1] = "random:0"
        assert fid_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"eval/fid.py: config error: --out {out} is in use by another run (host ")
        assert f"pid {os.getpid()}" in err and "--force" in err and len(err.splitlines()) == 1
        assert os.listdir(out) == [LOCK_NAME] and lock.held()


def test_the_encoder_refuses_an_out_folder_in_use_and_force_takes_it(tmp_path, image_folder, palette_file, capsys):
    out = tmp_path / "shards"
    lock = acquire(out, "--out", renew=False)
    assert encode_cli(encode_args(image_folder, out, palette_file)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"encode_imagenet: config error: --out {out} is in use by another run (host ")
    assert f"pid {os.getpid()}" in err and "--force" in err and len(err.splitlines()) == 1
    assert os.listdir(out) == [LOCK_NAME]
    assert encode_cli(encode_args(image_folder, out, palette_file, "--force")) == 0
    assert not lock.held() and not (out / LOCK_NAME).exists() and (out / "manifest.json").is_file()
    lock.release()
