"""Fault injection: signals with loader workers, empty and bad data, changed configs, broken files.

Each test drives one fault the way it happens in practice (a scheduler's SIGTERM to the process
group, a tar cut short, a rerun with other settings) and checks that no work is lost and nothing
is silently wrong: the run saves and resumes, or stops at once with a message naming the file or key.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env, make_image_folder, two_cpu_ranks
from PIL import Image
from test_train import TINY, config

import train_c2i
from mutor_vision.config import ConfigError
from mutor_vision.data import token_loader
from mutor_vision.errors import InputError
from mutor_vision.models import GPT, CheckpointError
from mutor_vision.shards import (
    DataMismatch,
    ShardError,
    iter_samples,
    read_manifest,
    write_manifest,
    write_shard,
    write_synthetic_shards,
)
from mutor_vision.training import checkpoints as checkpoints_module
from mutor_vision.training.c2i import train
from mutor_vision.training.checkpoints import CheckpointManager, CheckpointUnreadable
from tokenizer.encode_imagenet import main as encode_cli
from tokenizer.encode_imagenet import run as encode

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, num_shards=4, per_shard=16, grid=8, vocab_size=16, num_classes=10)
    return root


# ---------------------------------------------------------------- 1. SIGTERM with loader workers


def wait_for_line(proc: subprocess.Popen, needle: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before printing {needle!r}")
    raise AssertionError(f"no {needle!r} within {seconds} s")


def train_command(shards: Path, run: Path, *extra: str) -> list[str]:
    cmd = ["train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={run}", "steps=100000"]
    return [*cmd, "save_every=50000", "data.num_workers=2", "log_every=1", "tensorboard=false", *extra]


def assert_terminated_checkpoint(run: Path, world_size: int) -> Path:
    latest = CheckpointManager(run / "checkpoints", 1).latest()
    assert latest is not None, "no checkpoint saved"
    state = json.loads((latest / "state.json").read_text())
    assert state["reason"] == "terminated" and state["world_size"] == world_size and state["step"] >= 3
    return latest


def test_sigterm_to_the_process_group_saves_despite_loader_workers(tmp_path, shards):
    # What a cluster scheduler does: SIGTERM to every process of the job, loader workers included.
    run = tmp_path / "run"
    cmd = [sys.executable, *train_command(shards, run)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_line(proc, "step 3:")
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    latest = assert_terminated_checkpoint(run, world_size=1)
    step = json.loads((latest / "state.json").read_text())["step"]
    resumed = config(tmp_path, shards, f"steps={step + 2}", "save_every=50000", "data.num_workers=2")
    more = train(resumed, resume="auto", allow_change=["steps"])
    assert more.reason == "completed" and more.step == step + 2


def test_sigterm_to_the_launcher_saves_on_every_rank(tmp_path, shards):
    # torch elastic (accelerate launch --multi_gpu) forwards SIGTERM to each rank's process group.
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*two_cpu_ranks(), *train_command(shards, run)], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_line(proc, "step 3:")
        proc.send_signal(signal.SIGTERM)  # the launcher only
        _, err = proc.communicate(timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "is killed by signal" not in err, err[-3000:]
    assert_terminated_checkpoint(run, world_size=2)


# ---------------------------------------------------------------- 2. no samples


def test_encoder_with_no_readable_image_fails_and_writes_no_manifest(tmp_path, palette_file):
    folder = tmp_path / "images" / "n0"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"not an image")
    argv = ["--input", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--tokenizer", "palette"]
    argv += ["--tokenizer-path", str(palette_file), "--image-size", "8"]
    assert encode_cli(argv) == 4
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_rank_without_samples_fails_fast_naming_its_shards(tmp_path):
    root = tmp_path / "shards"
    manifest = write_synthetic_shards(root, num_shards=4, per_shard=3, grid=4, vocab_size=8, num_classes=2)
    raw = dict(manifest.raw)
    for name in ("train-000001.tar", "train-000003.tar"):  # rank 1 of 2 gets only these: empty them
        write_shard(root / name, [])
    raw["shard_counts"] = [3, 0, 3, 0]
    raw["num_samples"] = 6
    write_manifest(root, raw)
    for rank in (0, 1):  # every rank sees the empty share, so none waits for another
        with pytest.raises(ShardError, match=r"rank 1 of 2 .*train-000001\.tar"):
            token_loader(root, 2, 1, seed=0, rank=rank, world_size=2, num_workers=0)
    batches = list(token_loader(root, 2, 3, seed=0, num_workers=0))  # one rank: empty shards are skipped
    assert len(batches) == 3


def test_empty_shards_without_counts_are_an_error_not_a_hang(tmp_path):
    root = tmp_path / "shards"
    manifest = write_synthetic_shards(root, num_shards=2, per_shard=2, grid=4, vocab_size=8, num_classes=2)
    for name in manifest.shards:
        write_shard(root / name, [])
    raw = {k: v for k, v in manifest.raw.items() if k != "shard_counts"}  # a manifest from before the field
    write_manifest(root, raw)
    with pytest.raises(ShardError, match="read 0 samples"):
        list(token_loader(root, 2, 2, seed=0, num_workers=0))
    with pytest.raises(ShardError, match="all 2 shards of this rank are unreadable"):
        list(token_loader(root, 2, 2, seed=0, num_workers=0, on_error="skip"))


# ---------------------------------------------------------------- 3. per-sample validation


def one_shard(root: Path, samples: list, num_classes: int = 3, codebook: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    count = write_shard(root / "train-000000.tar", samples)
    write_manifest(root, {
        "num_samples": count, "num_shards": 1, "shards": ["train-000000.tar"], "shard_counts": [count],
        "grid": [2, 2], "num_crops": 1, "codebook_size": codebook, "num_classes": num_classes,
    })  # fmt: skip
    return root


@pytest.mark.parametrize(
    ("tokens", "label", "message"),
    [
        (np.zeros((1, 2, 2), np.int64), 3, r"class 3 outside \[0, 3\).*null class"),  # = num_classes
        (np.zeros((1, 2, 2), np.int64), -1, r"class -1 outside"),
        (np.full((1, 2, 2), 6, np.int64), 0, r"token ids span \[6, 6\], outside the codebook \[0, 6\)"),
        (np.zeros((1, 3, 3), np.int64), 0, r"has tokens \(1, 3, 3\), manifest grid \(2, 2\)"),
    ],
)
def test_bad_samples_name_shard_and_key_in_both_error_modes(tmp_path, tokens, label, message):
    good = [(f"ok{i}", np.ones((1, 2, 2), np.int64), 1) for i in range(3)]
    root = one_shard(tmp_path / "shards", [*good, ("bad_one", tokens, label)])
    for on_error in ("raise", "skip"):  # skipping cannot repair a dataset that does not fit
        with pytest.raises(DataMismatch, match=rf"train-000000\.tar: sample bad_one.*{message}|{message}"):
            list(token_loader(root, 2, 4, seed=0, num_workers=0, shuffle_buffer=1, on_error=on_error))


def test_float_tokens_are_an_error(tmp_path):
    import io

    import webdataset as wds

    root = tmp_path / "shards"
    root.mkdir()
    with wds.TarWriter(str(root / "train-000000.tar")) as writer:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((1, 2, 2), np.float32))
        writer.write({"__key__": "floaty", "tokens.npy": buffer.getvalue(), "cls": 0})
    write_manifest(root, {
        "num_samples": 1, "num_shards": 1, "shards": ["train-000000.tar"], "shard_counts": [1],
        "grid": [2, 2], "num_crops": 1, "codebook_size": 6, "num_classes": 3,
    })  # fmt: skip
    with pytest.raises(DataMismatch, match="floaty: tokens are float32"):
        list(token_loader(root, 1, 1, seed=0, num_workers=0))


def test_training_with_a_null_class_label_stops_naming_the_sample(tmp_path, shards):
    good = [(f"ok{i}", np.ones((1, 8, 8), np.int64), 1) for i in range(20)]
    root = tmp_path / "bad"
    root.mkdir()
    count = write_shard(root / "train-000000.tar", [*good, ("null_label", np.ones((1, 8, 8), np.int64), 10)])
    write_manifest(root, {**read_manifest(shards).raw, "shards": ["train-000000.tar"], "shard_counts": [count],
                          "num_samples": count, "num_shards": 1, "num_crops": 1})  # fmt: skip
    with pytest.raises(DataMismatch, match="null_label: class 10 outside"):
        train(config(tmp_path, root, "steps=4"))


# ---------------------------------------------------------------- 4 and 6. encoder: resume checks, unique keys


def encode_args(images: Path, out: Path, palette: Path, *extra: str) -> list[str]:
    argv = ["--input", str(images), "--out", str(out), "--tokenizer", "palette", "--tokenizer-path", str(palette)]
    return [*argv, "--image-size", "8", "--maxcount", "4", "--batch-size", "3", *extra]


def test_encoder_refuses_to_mix_settings_into_kept_shards(tmp_path, image_folder, palette_file):
    out = tmp_path / "out"
    assert encode(encode_args(image_folder, out, palette_file, "--limit-shards", "1")) is None
    for change in (["--crop", "center"], ["--maxcount", "5"], ["--image-size", "16"]):
        with pytest.raises(ConfigError, match="holds outputs made with other settings"):
            encode(encode_args(image_folder, out, palette_file, *change))
    assert encode_cli(encode_args(image_folder, out, palette_file, "--crop", "center")) == 2
    assert encode(encode_args(image_folder, out, palette_file))["num_samples"] == 15  # same settings: resumes
    # A stamp without finished shards (a run that failed early) does not block another setting.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "encode_settings.json").write_text(json.dumps({"crop": "ten-crop"}))
    assert encode(encode_args(image_folder, fresh, palette_file, "--crop", "center"))["num_crops"] == 1


def test_colliding_file_names_get_unique_keys(tmp_path, palette_file):
    images = make_image_folder(tmp_path / "images", classes=1, per_class=1)
    folder = next(images.iterdir())
    source = next(folder.iterdir())
    for name in ("x.png", "x.jpg", "a.b.png", "a_b.png"):  # x / x and a_b / a_b once dots are replaced
        Image.open(source).save(folder / name)
    manifest = encode(encode_args(images, tmp_path / "out", palette_file, "--maxcount", "10"))
    keys = [key for key, _, _ in iter_samples(read_manifest(tmp_path / "out"))]
    assert manifest["num_samples"] == 5 and len(set(keys)) == 5 and not any("." in k for k in keys)
    batches = list(token_loader(tmp_path / "out", 5, 2, seed=0, num_workers=0))  # a valid tar: it reads back
    assert len(batches) == 2


# ---------------------------------------------------------------- 5. a shard cut at a member boundary


def test_a_shard_cut_at_a_member_boundary_is_a_short_shard(tmp_path):
    import tarfile

    root = tmp_path / "shards"
    manifest = write_synthetic_shards(root, num_shards=2, per_shard=4, grid=4, vocab_size=8, num_classes=2)
    shard = root / manifest.shards[1]
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    cut = members[4].offset  # the tar header of the third sample: a well-formed, shorter tar
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardError, match=r"train-000001\.tar: corrupt or truncated.*read 2 samples.*lists 4"):
        list(token_loader(root, 2, 20, seed=0, num_workers=0, shuffle_buffer=1))
    batches = list(token_loader(root, 2, 20, seed=0, num_workers=0, shuffle_buffer=1, on_error="skip"))
    assert len(batches) == 20


# ---------------------------------------------------------------- 7. a kill while pruning


def test_a_kill_while_pruning_leaves_no_orphan(tmp_path, shards, monkeypatch):
    args = ["steps=6", "save_every=2", "keep_last=1"]
    original, calls = checkpoints_module.shutil.rmtree, {"n": 0}

    def dying_rmtree(path, *a, **k):
        if str(path).endswith(".trash") and Path(path).exists():
            calls["n"] += 1
            if calls["n"] == 1:  # delete a file or two, then die
                next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                raise KeyboardInterrupt("killed while pruning")
        return original(path, *a, **k)

    monkeypatch.setattr(checkpoints_module.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, shards, *args))
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step_00000002.trash", "step_00000004"]
    (root / "step_00000001").mkdir()  # the remains of an older, non-atomic delete
    (root / "step_00000001" / "weights").write_text("orphan")
    train(config(tmp_path, shards, *args), resume="auto")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006"]


# ---------------------------------------------------------------- 8. resume with another config


def test_resume_with_another_config_is_refused_before_anything_changes(tmp_path, shards, capsys):
    base = ["--config", str(TINY), f"data.root={shards}", f"out_dir={tmp_path / 'run'}", "tensorboard=false"]
    assert train_c2i.main([*base, "steps=4", "save_every=2"]) == 0
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    capsys.readouterr()
    assert train_c2i.main([*base, "--resume", "auto", "steps=4", "save_every=2", "model.dim=32"]) == 2
    err = capsys.readouterr().err
    assert "model.dim: 64 -> 32" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    changed = ["--resume", "auto", "steps=4", "save_every=2", "model.registers.weight=0.9", "optim.lr=5e-4"]
    assert train_c2i.main([*base, *changed]) == 2
    err = capsys.readouterr().err
    assert "model.registers.weight: 0.5 -> 0.9" in err and "optim.lr" in err and "--allow-change" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == recorded
    assert sorted((tmp_path / "run" / "checkpoints").iterdir()) == checkpoints
    # Fewer steps than the checkpoint: said so, not "completed".
    assert train_c2i.main([*base, "--resume", "auto", "steps=2", "save_every=2"]) == 2
    assert "at step 4, beyond this config's 2 steps" in capsys.readouterr().err
    # More steps, allowed explicitly: trains on; the recorded config follows.
    assert train_c2i.main([*base, "--resume", "auto", "steps=6", "save_every=2"]) == 2
    assert train_c2i.main([*base, "--resume", "auto", "--allow-change", "steps", "steps=6", "save_every=2"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()
    assert "steps: 6" in (tmp_path / "run" / "config.yaml").read_text()
    # Where the run reports may change freely.
    assert train_c2i.main([*base, "--resume", "auto", "steps=6", "save_every=2", "log_every=1"]) == 0


def test_a_checkpoint_of_older_code_resumes_when_new_keys_keep_their_defaults(tmp_path, shards, capsys):
    # Older code recorded no model.head_chunk_size (added since). At its default (0: the old
    # behaviour) the resume goes on; set to something else it is a change like any other.
    base = ["--config", str(TINY), f"data.root={shards}", f"out_dir={tmp_path / 'run'}", "tensorboard=false"]
    assert train_c2i.main([*base, "steps=2", "save_every=2"]) == 0
    state_path = tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["model"]["head_chunk_size"]
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    assert train_c2i.main([*base, "--resume", "auto", "steps=2", "save_every=2", "model.head_chunk_size=16"]) == 2
    assert "model.head_chunk_size: None -> 16" in capsys.readouterr().err
    assert train_c2i.main([*base, "--resume", "auto", "--allow-change", "steps", "steps=4", "save_every=2"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()


# ---------------------------------------------------------------- 9. an unreadable newest checkpoint


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, shards, caplog):
    args = ["steps=6", "save_every=2", "keep_last=3"]
    straight = train(config(tmp_path / "a", shards, *args))
    train(config(tmp_path / "b", shards, "steps=4", "save_every=2", "keep_last=3"))
    root = tmp_path / "b" / "run" / "checkpoints"
    optimizer = root / "step_00000004" / "accelerate" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointUnreadable, match=r"step_00000004: checkpoint files unreadable"):
        train(config(tmp_path / "b", shards, *args), resume=str(root / "step_00000004"), allow_change=["steps"])
    resumed = train(config(tmp_path / "b", shards, *args), resume="auto", allow_change=["steps"])
    assert "falling back to" in caplog.text and str(root / "step_00000002") in caplog.text
    assert resumed.losses == straight.losses[2:]  # continued exactly from step 2
    assert (root / "unreadable-step_00000004").is_dir()  # kept for inspection, out of the way


# ---------------------------------------------------------------- 10. command-line error paths


def test_cli_errors_are_one_line_with_documented_exit_codes(tmp_path, shards, capsys):
    assert train_c2i.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert train_c2i.main(["--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml: cannot read it" in err and "a directory, not a YAML file" in err
    assert train_c2i.main(["--config", str(TINY), f"out_dir={tmp_path / 'r'}"]) == 2  # no data.root
    assert "data.root: must be set" in capsys.readouterr().err
    assert train_c2i.main(["--config", str(TINY), f"data.root={tmp_path}", f"out_dir={tmp_path / 'r'}"]) == 4
    err = capsys.readouterr().err
    assert "no manifest" in err and "Traceback" not in err and not (tmp_path / "r").exists()
    assert train_c2i.main(["--config", str(TINY), f"data.root={shards}", f"out_dir={tmp_path / 'r'}",
                           "model.vocab_size=32"]) == 4  # fmt: skip
    assert "codebook size 16 but the model's vocab_size is 32" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # found before out_dir was written
    assert train_c2i.main(["--config", str(TINY), "steps=ten"]) == 2
    assert "command line (steps=ten): steps: expected an integer" in capsys.readouterr().err


def test_checkpoint_inputs_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, I am a text file\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        GPT.from_pretrained(tmp_path / "notes.pt")
    export = tmp_path / "export"
    GPT(config(tmp_path, tmp_path).model).save_pretrained(export)
    (export / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json missing"):
        GPT.from_pretrained(export)
    assert issubclass(CheckpointError, InputError)


# ---------------------------------------------------------------- 12. file modes of exports


def test_exports_are_readable_by_others_under_the_umask(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    GPT(config(tmp_path, tmp_path).model).save_pretrained(tmp_path / "export")
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((tmp_path / "export" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))  # not the 0600 of a private temp file


# ---------------------------------------------------------------- 13. shards vs model: the keys to set


def test_vq16_shards_on_the_tiny_config_name_the_overrides(tmp_path, capsys):
    vq = tmp_path / "vq"
    write_synthetic_shards(vq, num_shards=1, per_shard=2, grid=16, vocab_size=16384, num_classes=10)
    assert train_c2i.main(["--config", str(TINY), f"data.root={vq}", f"out_dir={tmp_path / 'r'}"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("to train on these shards set model.grid_size=16 model.vocab_size=16384")
    assert "grid 16x16 but the model's grid_size is 8" in err[0] and not (tmp_path / "r").exists()


def test_a_label_beyond_the_model_classes_names_model_num_classes(tmp_path):
    # A manifest without classes (webdataset input, no classes.txt): the model's count bounds labels.
    good = [(f"ok{i}", np.ones((1, 2, 2), np.int64), 1) for i in range(3)]
    root = one_shard(tmp_path / "shards", [*good, ("too_big", np.ones((1, 2, 2), np.int64), 3)], num_classes=None)
    expect = dict(grid_size=2, vocab_size=6, num_classes=3)
    with pytest.raises(DataMismatch, match=r"too_big: class 3 outside \[0, 3\) \(model\.num_classes: 3;"):
        list(token_loader(root, 2, 2, seed=0, num_workers=0, shuffle_buffer=1, expect=expect))
    write_manifest(root, {**read_manifest(root).raw, "num_classes": 5})  # more data classes than the model
    with pytest.raises(ShardError, match=r"5 classes but the model's num_classes is 3; .* set model\.num_classes=5"):
        token_loader(root, 2, 2, seed=0, num_workers=0, expect=expect)


def test_inception_score_of_one_sample_is_null_with_a_reason(caplog):
    import logging

    from mutor_vision.evaluation.metrics import inception_score_metrics

    caplog.set_level(logging.INFO)
    one = inception_score_metrics(np.random.default_rng(0).normal(size=(1, 1008)))
    assert one["inception_score"] is None and one["inception_score_std"] is None
    assert one["inception_score_note"] == "left out: 1 sample(s); IS needs at least 2"
    assert "Inception Score left out: 1 sample(s)" in caplog.text
    enough = inception_score_metrics(np.random.default_rng(0).normal(size=(20, 1008)) * 3)
    assert enough["inception_score"] > 1.0 and "inception_score_note" not in enough
