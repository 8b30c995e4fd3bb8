"""Several machines: a lost one stops the rest within seconds in one line (exit 6), the launcher
adds no traceback, waits notice a dead peer, and the SLURM template's commands are right."""

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import ROOT

from mutor_vision import peers as peers_module
from mutor_vision.cli import EXIT_PEER_LOST
from mutor_vision.errors import PeerLost
from mutor_vision.launch import EXIT_BARRIER_S, failure_code
from mutor_vision.peers import Peers
from mutor_vision.processes import lost_peer
from mutor_vision.shards import write_synthetic_shards

sys.path.insert(0, str(ROOT / "bench"))
from faults import Job, export_bytes, last_line, machine_train_args  # bench/ is a folder of scripts

SBATCH = ROOT / "configs" / "slurm" / "train.sbatch"


# ---------------------------------------------------------------- two loopback machines


def test_a_lost_machine_stops_the_survivor_in_one_line_and_the_job_resumes(tmp_path):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_shards=2, per_shard=16, grid=8, vocab_size=16, num_classes=10)
    run, steps = tmp_path / "run", 12
    args = machine_train_args(shards, run, steps)
    job = Job(args)
    assert job.wait_until(lambda: job.logged("step 3:"), timeout=120), job.stderr(0)[-2000:]
    killed_at = job.kill(1)
    code = job.finish(timeout=120)[0]
    text = job.stderr(0)
    assert code == EXIT_PEER_LOST, text[-2000:]
    assert job.ended[0] - killed_at < 30
    assert "Traceback" not in text
    line = last_line(text)
    assert line.startswith("train_c2i: lost another rank (") and "--resume auto" in line, line
    assert "on every machine, run: [the same launcher and options: 2 processes] train_c2i.py" in line

    again = Job([*args, "--resume", "auto"])
    assert again.finish(timeout=180) == [0, 0], again.stderr(0)[-2000:]
    assert export_bytes(run, steps)  # the resumed job reached its last step (bench/faults.py: bit-exact)


def test_an_agent_whose_ranks_succeeded_waits_for_a_dead_machine_only_briefly_and_silently(tmp_path):
    script = tmp_path / "uneven.py"  # machine 0's rank ends at once, machine 1's much later
    script.write_text('import os, time\ntime.sleep(1 if os.environ["RANK"] == "0" else 60)\n')
    job = Job([str(script)])
    time.sleep(3)  # rank 0 has ended; its agent waits in torch's exit barrier for machine 1's
    assert job.running()
    killed_at = job.kill(1)
    assert job.finish(timeout=120)[0] == 0  # its work was done
    assert job.ended[0] - killed_at < EXIT_BARRIER_S + 10  # torch's agent alone would wait 300 s
    assert job.stderr(0) == ""  # no agent log lines, no C++ socket warnings


# ---------------------------------------------------------------- the launcher's exit codes


class Failure:
    def __init__(self, exitcode: int, pid: int = 123) -> None:
        self.exitcode, self.pid = exitcode, pid


def test_the_launcher_keeps_a_rank_s_documented_code_and_says_one_line_for_a_silent_death(capsys):
    assert failure_code({0: Failure(2), 1: Failure(1)}, "train_c2i.py") == 2  # the rank said why
    assert failure_code({1: Failure(6)}, "train_c2i.py") == EXIT_PEER_LOST
    assert capsys.readouterr().err == ""
    assert failure_code({0: Failure(1)}, "train_c2i.py") == 1  # a bug: its traceback is above
    assert failure_code({3: Failure(-9, pid=77)}, "eval/fid.py") == EXIT_PEER_LOST
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "eval/fid.py: rank 3 (pid 77) was killed (SIGKILL); this machine stopped: "
        "run the same command again on every machine to go on"
    ]


def test_collective_errors_read_as_a_lost_peer_only_in_a_launched_run(monkeypatch):
    gloo = RuntimeError(
        "[../third_party/gloo/pair.cc:545] Read error [127.0.0.1]:49796: Connection reset by peer. More"
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lost_peer(gloo) is None  # one process: nobody else to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(gloo) == "a collective failed: Read error [127.0.0.1]:49796: Connection reset by peer"
    assert (
        lost_peer(PeerLost("rank 1 (node-b) stopped answering 16 s ago"))
        == "rank 1 (node-b) stopped answering 16 s ago"
    )
    wrapped = ValueError("saving failed")
    wrapped.__cause__ = gloo
    assert lost_peer(wrapped).startswith("a collective failed")
    assert lost_peer(RuntimeError("shape mismatch")) is None
    assert lost_peer(ValueError("Connection reset by peer")) is None  # only torch's own errors


# ---------------------------------------------------------------- peers.py through a store


def test_wait_returns_when_every_rank_arrives_however_late(monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(peers_module, "DEAD_AFTER_S", 0.5)
    store = dist.HashStore()
    rank0, rank1 = Peers(store, 0, 2), Peers(store, 1, 2)
    arrived = threading.Event()

    def late() -> None:
        time.sleep(1.0)  # twice DEAD_AFTER_S: slow, but beating, is not lost
        rank1.wait("sampled")
        arrived.set()

    threading.Thread(target=late, daemon=True).start()
    rank0.wait("sampled")
    assert arrived.wait(5)


def test_a_rank_whose_heartbeat_stops_is_lost_within_the_dead_time(monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(peers_module, "DEAD_AFTER_S", 0.3)
    store = dist.HashStore()
    store.set("mutor/peers/host/1", "node-b")
    rank0 = Peers(store, 0, 2)  # rank 1 never beats: as if its machine were gone
    start = time.monotonic()
    with pytest.raises(PeerLost, match=r"rank 1 \(node-b\) stopped answering"):
        rank0.wait("stamp")
    assert time.monotonic() - start < 3


def test_a_rank_that_stops_with_an_error_says_why_to_the_others_at_once(monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.02)
    store = dist.HashStore()
    rank0, rank1 = Peers(store, 0, 2), Peers(store, 1, 2)
    store.set("mutor/peers/host/0", "node-a")
    rank0.announce("storage fault: cannot write the evaluation's outputs (runs/eval: No space left on device)")
    start = time.monotonic()
    with pytest.raises(PeerLost, match=r"^rank 0 \(node-a\) stopped: storage fault: cannot write"):
        rank1.wait("end")
    assert time.monotonic() - start < 1  # not the heartbeat's dead time


def test_a_store_that_fails_stops_the_rank_at_its_next_check(monkeypatch):
    monkeypatch.setattr(peers_module, "HEARTBEAT_S", 0.02)

    class GoneStore(dist.HashStore):
        def add(self, key: str, value: int) -> int:
            raise RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote crash?")

    store = GoneStore()
    with pytest.raises(
        PeerLost, match=r"store \(on the first machine\) cannot be reached: Failed to recv, got 0 bytes$"
    ):
        Peers(store, 1, 2).wait("stamp")


def test_a_process_with_heartbeats_ends_with_its_own_code_not_an_abort():
    # A heartbeat thread inside the store's C++ call when the interpreter ends aborted the process
    # (exit 134, "terminate called without an active exception"): 32 threads beating without a pause
    # made that certain before Peers stopped them at exit.
    script = (
        "import sys, torch.distributed as dist\n"
        "from mutor_vision import peers\n"
        "peers.HEARTBEAT_S = 0.0\n"
        "store = dist.HashStore()\n"
        "beating = [peers.Peers(store, 0, 2) for _ in range(32)]\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (done.returncode, done.stderr) == (3, "")


# ---------------------------------------------------------------- the SLURM template


def sbatch(args: list[str], fake_bin: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", **env}
    if fake_bin is not None:
        environ["PATH"] = f"{fake_bin}:{environ['PATH']}"
    return subprocess.run(
        ["bash", str(SBATCH), *args], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=60
    )


def test_the_slurm_dry_run_prints_each_node_s_launch_command():
    from accelerate.commands.launch import launch_command_parser

    result = sbatch(
        ["train_c2i.py", "--config", "configs/c2i/llamagen_b_mutor2d.yaml", "out_dir=/shared/a b"], DRY_RUN="1"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["gpu-a", "gpu-b"]
    for node, line in enumerate(lines):
        words = shlex.split(line.split(": ", 1)[1])
        assert words[:3] == ["python", "-m", "mutor_vision.launch"]
        parsed = launch_command_parser().parse_args(words[3:])  # every option is accelerate launch's own
        assert (parsed.machine_rank, parsed.num_machines, parsed.num_processes) == (node, 2, 16)
        assert parsed.main_process_ip == "gpu-a" and parsed.config_file == "configs/accelerate/multinode_ddp.yaml"
        assert parsed.training_script == "train_c2i.py"
        assert parsed.training_script_args == [
            "--config", "configs/c2i/llamagen_b_mutor2d.yaml", "out_dir=/shared/a b", "--resume", "auto"
        ]  # fmt: skip


@pytest.mark.parametrize(("srun_exit", "requeued", "exit"), [(EXIT_PEER_LOST, True, 0), (2, False, 2), (0, False, 0)])
def test_the_slurm_job_requeues_after_a_lost_peer_only(tmp_path, srun_exit, requeued, exit):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {tmp_path}/calls\nexit {srun_exit}\n')
    (fake / "scontrol").write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = show ]; then echo gpu-a; echo gpu-b; else echo "scontrol $*" >> {tmp_path}/calls; fi\n'
    )
    for tool in fake.iterdir():
        tool.chmod(0o755)
    result = sbatch(["train_c2i.py", "--config", "c.yaml"], fake_bin=fake, SLURM_JOB_NODELIST="gpu-[a-b]")
    assert result.returncode == exit, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("srun --kill-on-bad-exit=0 bash -c")
    assert "--main_process_ip gpu-a" in calls[0] and calls[0].endswith("train_c2i.py --config c.yaml --resume auto")
    assert (calls[1:] == ["scontrol requeue 42"]) == requeued
