"""Storage faults: a full disk or a file size limit stops a command with one line and exit 5.

The fault is real where it can be: a child process under ``RLIMIT_FSIZE`` (no root needed) gets
EFBIG from the kernel for every write past the limit, the way a full disk gives ENOSPC. Each test
checks the one line (folder, OS error, what to do), that nothing partial is left, and that what
was complete before is untouched and continues.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLORS, child_env, make_image_folder
from safetensors import SafetensorError
from test_train import TINY, config, exported

from mutor_vision import files
from mutor_vision.errors import StorageError
from mutor_vision.evaluation import INCEPTION_FILE, save_random_inception_weights
from mutor_vision.evaluation import samples as samples_module
from mutor_vision.files import is_storage_error, storage_error, storage_faults
from mutor_vision.models import GPT, GPTConfig, RegisterConfig
from mutor_vision.models.checkpoint import save_export
from mutor_vision.shards import write_synthetic_shards
from mutor_vision.training.c2i import train
from mutor_vision.training.checkpoints import CheckpointManager
from tokenizer import PaletteTokenizer

resource = pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only
ROOT = Path(__file__).resolve().parent.parent
EFBIG = f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, num_shards=4, per_shard=16, grid=8, vocab_size=16, num_classes=10)
    return root


def run_limited(args: list[str], max_file_bytes: int) -> subprocess.CompletedProcess:
    """``python args...`` from the repository root, no file of it allowed past ``max_file_bytes``."""

    def limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        soft = max_file_bytes if hard == resource.RLIM_INFINITY else min(max_file_bytes, hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
        preexec_fn=limit,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The command's one error line (log lines aside), with exit code 5 and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{command}: ")]
    assert result.returncode == 5 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): files.file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- training: a save that does not fit


def test_a_save_past_the_file_size_limit_exits_5_and_the_rerun_is_exact(tmp_path, shards, monkeypatch, caplog):
    straight = tmp_path / "straight" / "run"
    train(config(tmp_path / "straight", shards, "steps=4", "save_every=2"))
    run = tmp_path / "run"
    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as patch:  # the start-up warning of a disk that cannot hold the checkpoints
        patch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
        train(config(tmp_path, shards, "steps=2", "save_every=2", "keep_last=2"))
    # The tiny model: 2 x 0.53 MB of weights + 1.06 MB of AdamW state per checkpoint, 3 to hold.
    expect = "1.0 MB free, 3 more checkpoint(s) (keep_last 2 + one being saved, ~2.1 MB each) need about 6.4 MB"
    assert f"low on space in {run / 'checkpoints'}: {expect}" in caplog.text
    step2 = run / "checkpoints" / "step_00000002"
    before = digests(step2)
    argv = ["--config", str(TINY), f"data.root={shards}", f"out_dir={run}", "tensorboard=false", "save_every=2"]
    argv += ["steps=4", "--resume", "auto", "--allow-change", "steps"]
    # optimizer.bin (~1 MB) passes the limit: torch's writer fails and loses the errno.
    line = one_line(run_limited(["train_c2i.py", *argv], 800_000), "train_c2i")
    assert line.startswith(f"train_c2i: cannot save checkpoint step_00000004: {EFBIG} (")
    assert "the file size limit (ulimit -f) is 800,000 bytes" in line and f"({run / 'checkpoints'})" in line
    assert f"the partial checkpoint was removed, the newest complete one is {step2}" in line
    assert line.endswith(f"make room, then resume: python train_c2i.py {' '.join(argv[:-5])} steps=4 "
                         "--allow-change steps --resume auto")  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # no .step_*.tmp
    assert digests(step2) == before
    resumed = train(config(tmp_path, shards, "steps=4", "save_every=2"), resume="auto", allow_change=["steps"])
    assert resumed.step == 4
    ours, theirs = exported(run, 4), exported(straight, 4)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------- eval/fid.py: samples.npz that does not fit


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = GPTConfig(
        size=None, n_layer=1, n_head=2, dim=32, vocab_size=len(COLORS), num_classes=3, grid_size=8,
        registers=RegisterConfig(mode="ntp"),
    )  # fmt: skip
    palette = PaletteTokenizer(COLORS)
    palette.save(root / "palette.json")
    record = {"kind": "palette", "path": str(root / "palette.json"), "checksum": palette.checksum}
    model = GPT(config)
    save_export(root / "export", model.state_dict(), model.config, tokenizer=record)
    return root / "export"


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    """Random Inception weights saved beforehand (``random:SEED`` would write them under the limit)."""
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def fid_args(export: Path, inception: Path, out: Path, num_samples: int) -> list[str]:
    return [
        "eval/fid.py", "--ckpt", str(export), "--num-samples", str(num_samples), "--batch-size", str(num_samples),
        "--inception-weights", str(inception), "--out", str(out), "--device", "cpu", "--no-reference",
    ]  # fmt: skip


def test_eval_npz_past_the_file_size_limit_exits_5_keeping_the_pngs(tmp_path, export, inception):
    out = tmp_path / "eval"
    # 12 samples of 8x8: PNGs of ~200 bytes, the npz ~2.6 KB; the lock and settings (< 1.5 KB) fit.
    line = one_line(run_limited(fid_args(export, inception, out, 12), 2_000), "eval/fid.py")
    assert line.startswith(f"eval/fid.py: cannot write samples.npz: {EFBIG} (the file size limit (ulimit -f) is")
    assert f"({out}); the samples written are kept: make room" in line
    assert len(list((out / "samples").glob("*.png"))) == 12
    assert not list(out.rglob("*.tmp")) and not (out / "samples.npz").exists()


def test_eval_png_writes_on_a_full_disk_exit_5(tmp_path, export, inception, monkeypatch, capsys):
    # A full disk's ENOSPC, injected into the PNG writer threads (a limit small enough for a PNG
    # would stop the lock file first).
    from eval import fid as fid_cli

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(samples_module, "write_png", full)
    monkeypatch.setattr(files, "file_size_limit", lambda: None)
    assert fid_cli.main(fid_args(export, inception, tmp_path / "eval", 4)[1:]) == 5
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval/fid.py")]
    assert len(err) == 1, err
    assert err[0].startswith("eval/fid.py: cannot write sample PNGs: [Errno 28] No space left on device (")
    assert f"({tmp_path / 'eval' / 'samples'}); the samples written are kept" in err[0]


# ---------------------------------------------------------------- the encoder: a shard that does not fit


def test_encoder_shard_past_the_file_size_limit_exits_5_and_resumes(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    PaletteTokenizer(COLORS).save(tmp_path / "palette.json")
    out = tmp_path / "out"
    argv = ["tokenizer/encode_imagenet.py", "--input", str(images), "--out", str(out), "--tokenizer", "palette"]
    argv += ["--tokenizer-path", str(tmp_path / "palette.json"), "--image-size", "8", "--workers", "1"]
    line = one_line(run_limited(argv, 4096), "encode_imagenet")  # 4 samples: a ~9 KB tar
    assert line == (
        f"encode_imagenet: cannot write shard train-000000.tar: {EFBIG} (the file size limit (ulimit -f) is "
        f"4,096 bytes) ({out}); finished shards are kept: make room, then run the same command to go on"
    )
    assert not list(out.glob(".*.tmp")) and not list(out.glob("train-*"))
    rerun = subprocess.run([sys.executable, *argv], cwd=ROOT, env=child_env(), capture_output=True, timeout=300)
    assert rerun.returncode == 0 and json.loads((out / "manifest.json").read_text())["num_samples"] == 4


# ---------------------------------------------------------------- telling storage faults apart


def test_storage_faults_are_told_by_errno_and_by_torchs_lost_errno(tmp_path, monkeypatch):
    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 743168 vs 743056")
    assert is_storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_error(OSError(errno.EDQUOT, "Disk quota exceeded")) and is_storage_error(lost)
    assert is_storage_error(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"))
    assert not is_storage_error(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_storage_error(RuntimeError("PytorchStreamReader failed reading zip archive"))  # a corrupt file
    assert not is_storage_error(ValueError("unexpected pos"))
    monkeypatch.setattr(files, "file_size_limit", lambda: None)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_500))
    error = storage_error(lost, tmp_path, "cannot save x")
    assert str(error) == (
        f"cannot save x: [Errno 28] No space left on device (inferred: torch's writer lost the OS error; 1.5 KB free) "
        f"({tmp_path})"
    )
    eio = r"cannot write y: \[Errno 5\] Input/output error"
    with pytest.raises(StorageError, match=eio) as caught, storage_faults(tmp_path, "cannot write y"):
        raise OSError(errno.EIO, "Input/output error")
    assert caught.value.errno == errno.EIO
    with pytest.raises(KeyError), storage_faults(tmp_path, "z"):  # anything else goes through as it is
        raise KeyError("bug")


# ---------------------------------------------------------------- warnings before any work


def test_low_free_space_is_warned_before_training_and_eval(tmp_path, monkeypatch):
    # (the training loop's call is checked in the first test)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=2)
    (manager.root / "step_00000002").mkdir(parents=True)
    (manager.root / "step_00000002" / "state.json").write_text("{}")
    assert "2 more checkpoint(s)" in manager.check_space(130_000, 130_000, ema=False)  # one is there already
    assert samples_module.check_space(tmp_path / "eval", 50_000, 256, npz=True) == (
        f"low on space in {tmp_path / 'eval'}: 1.0 MB free, 50,000 PNGs and samples.npz need about 19.7 GB; "
        "writing will fail (exit 5) unless room is made"
    )
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**12))
    assert samples_module.check_space(tmp_path / "eval", 50_000, 256, npz=True) is None
    assert manager.check_space(130_000, 130_000, ema=True) is None


def test_an_export_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from mutor_vision.models import checkpoint as checkpoint_module

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    registers = RegisterConfig(mode="ntp")
    model = GPT(GPTConfig(size=None, n_layer=1, n_head=2, dim=32, vocab_size=6, num_classes=3, grid_size=4,
                          registers=registers))  # fmt: skip
    with pytest.raises(StorageError, match=r"cannot write the export: \[Errno 28\] No space left on device"):
        save_export(tmp_path / "export", model.state_dict(), model.config)
    assert list((tmp_path / "export").iterdir()) == []
