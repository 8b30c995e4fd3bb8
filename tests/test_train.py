"""train_c2i: learning, exact resume, SIGTERM, kill during save, NaN stop, config errors, two ranks."""

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_two_cpu_ranks
from safetensors.torch import load_file

import train_c2i
from mutor_vision.config import ConfigError, load_yaml
from mutor_vision.errors import TrainingDiverged
from mutor_vision.models import GPT
from mutor_vision.shards import write_synthetic_shards
from mutor_vision.training import checkpoints as checkpoints_module
from mutor_vision.training.c2i import train
from mutor_vision.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "c2i" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, num_shards=4, per_shard=16, grid=8, vocab_size=16, num_classes=10)
    return root


def config(tmp_path: Path, shards: Path, *overrides: str) -> TrainConfig:
    base = [f"data.root={shards}", f"out_dir={tmp_path / 'run'}", "tensorboard=false"]
    return load_yaml(TrainConfig, TINY, [*base, *overrides])


def exported(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "export" / "model.safetensors")


def test_tiny_config_learns_a_small_dataset(tmp_path):
    small = tmp_path / "small"
    write_synthetic_shards(small, num_shards=2, per_shard=4, grid=8, vocab_size=16, num_classes=10, num_crops=1)
    result = train(
        config(
            tmp_path,
            small,
            "steps=60",
            "save_every=60",
            "model.token_dropout=0.0",
            "model.resid_dropout=0.0",
            "model.ffn_dropout=0.0",
            "model.class_dropout=0.0",
            "tensorboard=true",
        )
    )
    assert result.reason == "completed" and result.step == 60 and len(result.losses) == 60
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    run = tmp_path / "run"
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # TensorBoard scalars written
    model = GPT.from_pretrained(run / "checkpoints" / "step_00000060" / "export")
    assert model.config.registers.mode == "mutor2d"
    # The export records the classes its data held, so eval/fid.py samples those by default.
    data = json.loads((run / "checkpoints" / "step_00000060" / "export" / "data.json").read_text())
    assert data["num_classes"] == 10


def stop_after(monkeypatch, calls: int) -> None:
    """Send this process SIGTERM during the ``calls``-th training forward (loss computation)."""
    original = GPT.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            signal.raise_signal(signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)


def test_resume_is_exact_mid_segment_with_ema(tmp_path, shards, monkeypatch):
    # 7 steps with accumulation 2, checkpoints every 3: interrupted by SIGTERM inside step 5, saved
    # at 5 (mid-segment), resumed; losses and weights equal an uninterrupted run bit for bit.
    args = ["steps=7", "save_every=3", "ema.enabled=true", "ema.decay=0.9"]
    straight = train(config(tmp_path / "a", shards, *args))
    stop_after(monkeypatch, calls=2 * 4 + 1)  # the first micro-batch of step 5
    first = train(config(tmp_path / "b", shards, *args))
    assert first.reason == "terminated" and first.step == 5
    monkeypatch.undo()
    second = train(config(tmp_path / "b", shards, *args), resume="auto")
    assert second.reason == "completed" and second.step == 7
    assert first.losses + second.losses == straight.losses
    a, b = exported(tmp_path / "a" / "run", 7), exported(tmp_path / "b" / "run", 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(tmp_path / "a" / "run" / "checkpoints" / "step_00000007" / "export_ema" / "model.safetensors")
    ema_b = load_file(tmp_path / "b" / "run" / "checkpoints" / "step_00000007" / "export_ema" / "model.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    kept = sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000007"]  # keep_last 2


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, shards, monkeypatch):
    args = ["steps=6", "save_every=3"]
    straight = train(config(tmp_path / "a", shards, *args))
    original = checkpoints_module.CheckpointManager.save
    calls = {"n": 0}

    def dying_save(self, accelerator, step, state, export):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies after accelerate wrote its files
            accelerator.save_state(str(self.root / f".step_{step:08d}.tmp" / "accelerate"))
            raise KeyboardInterrupt("killed during save")
        return original(self, accelerator, step, state, export)

    monkeypatch.setattr(checkpoints_module.CheckpointManager, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", shards, *args))
    monkeypatch.undo()
    run = tmp_path / "b" / "run" / "checkpoints"
    assert (run / ".step_00000006.tmp").is_dir() and (run / "step_00000003" / "state.json").is_file()
    assert not (run / "step_00000006").exists()
    with pytest.raises(ConfigError, match="--resume auto"):  # never silently start over
        train(config(tmp_path / "b", shards, *args))
    resumed = train(config(tmp_path / "b", shards, *args), resume="auto")
    assert resumed.losses == straight.losses[3:]
    a, b = exported(tmp_path / "a" / "run", 6), exported(tmp_path / "b" / "run", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob(".*.tmp"))  # the partial save was cleaned up


def test_nan_loss_stops_with_checkpoint_intact(tmp_path, shards, monkeypatch):
    original = GPT.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        count["n"] += 1
        output = original(self, *args, **kwargs)
        if count["n"] > 8:  # from step 5 on (2 micro-batches per step)
            output.loss["loss"] = output.loss["loss"] * float("nan")
        return output

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"step 4 .*last good checkpoint: .*step_00000003"):
        train(config(tmp_path, shards, "steps=8", "save_every=3"))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003"]
    weights = exported(tmp_path / "run", 3)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_config_errors_name_the_key(tmp_path, shards, capsys):
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        config(tmp_path, shards, "optim.lrr=1")
    with pytest.raises(ConfigError, match=r"optim.*lr: must be > 0"):
        config(tmp_path, shards, "optim.lr=-1")
    with pytest.raises(ConfigError, match=r"model\.registers\.mode"):
        config(tmp_path, shards, "model.registers.mode=mutor3d")
    with pytest.raises(ConfigError, match="global_batch_size"):
        config(tmp_path, shards, "global_batch_size=12")
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        config(tmp_path, shards, "steps=ten")
    assert config(tmp_path, shards, "mixed_precision=no").mixed_precision == "no"  # YAML would read False
    assert train_c2i.main(["--config", str(TINY), "model.n_layerz=3"]) == 2
    assert "model.n_layerz" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(TrainConfig, bad)


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs" / "c2i").glob("*.yaml")):
        loaded = load_yaml(TrainConfig, path)
        assert loaded.global_batch_size % loaded.micro_batch_size == 0, path
    paper = load_yaml(TrainConfig, ROOT / "configs" / "c2i" / "llamagen_b_mutor2d.yaml")
    assert (paper.global_batch_size, paper.optim.lr, paper.steps, paper.model.registers.num_registers) == (
        1024,
        4e-4,
        360_000,
        80,
    )
    assert paper.optim.betas == [0.9, 0.95] and paper.optim.weight_decay == 0.05 and paper.optim.grad_clip == 1.0
    assert paper.model.registers.weight == 0.5 and paper.model.registers.d_max_2d == 4
    assert paper.mixed_precision == "bf16" and paper.optim.schedule == "constant" and paper.compile


@pytest.mark.parametrize("mode", ["mutor2d", "ntp"])
def test_two_rank_cpu_training_run(tmp_path, shards, mode):
    cmd = ["train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={tmp_path / 'run'}", "steps=4"]
    cmd += ["save_every=2", f"model.registers.mode={mode}"]  # ntp: the unused register vector must not stall DDP
    result = run_two_cpu_ranks(cmd)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["accumulation"] == 1  # 16 = 8 per rank × 2 ranks
    assert GPT.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000004" / "export") is not None


def test_init_from_an_official_layout_checkpoint(tmp_path, shards, caplog):
    # A LlamaGen-style DDP file (state under "model", "module." prefixes, no register vector).
    cfg = config(tmp_path, shards)
    torch.manual_seed(123)
    source = GPT(cfg.model)
    official = {f"module.{k}": v for k, v in source.state_dict().items() if k != "register_embedding"}
    torch.save({"model": official, "steps": 0}, tmp_path / "c2i_tiny.pt")
    result = train(config(tmp_path, shards, f"init_from={tmp_path / 'c2i_tiny.pt'}", "steps=1", "optim.lr=1e-12"))
    assert result.step == 1 and "register_embedding" in caplog.text  # freshly initialised, and said so
    weights = exported(tmp_path / "run", 1)
    torch.testing.assert_close(weights["tok_embeddings.weight"], source.tok_embeddings.weight, atol=1e-8, rtol=0)


def test_explicit_resume_of_an_older_checkpoint_sets_newer_ones_aside(tmp_path, shards):
    args = ["steps=6", "save_every=3"]
    straight = train(config(tmp_path, shards, *args))
    checkpoints = tmp_path / "run" / "checkpoints"
    resumed = train(config(tmp_path, shards, *args), resume=str(checkpoints / "step_00000003"))
    assert resumed.losses == straight.losses[3:]
    assert (checkpoints / "abandoned-step_00000006" / "state.json").is_file()  # kept, but out of the way
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_00000003",
        "step_00000006",
    ]


def test_register_vector_is_frozen_without_registers(tmp_path, shards):
    assert not GPT(config(tmp_path, shards, "model.registers.mode=ntp").model).register_embedding.requires_grad
    assert GPT(config(tmp_path, shards).model).register_embedding.requires_grad


def test_startup_summary_class_warning_and_a_finished_resume(tmp_path, caplog, capsys):
    import logging
    import sys

    two = tmp_path / "two_classes"
    write_synthetic_shards(two, num_shards=2, per_shard=8, grid=8, vocab_size=16, num_classes=2)
    args = ["--config", str(TINY), f"data.root={two}", f"out_dir={tmp_path / 'run'}", "tensorboard=false"]
    args += ["steps=2", "save_every=2", "log_every=1"]
    caplog.set_level(logging.INFO)
    console = logging.StreamHandler(sys.stderr)  # as setup_logging's, on the stderr pytest captures
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(console)
    try:
        assert train_c2i.main(args) == 0
        err = capsys.readouterr().err
        assert train_c2i.main([*args, "--resume", "auto"]) == 0
    finally:
        logging.getLogger().removeHandler(console)
    assert f"start-up data: {two}: 16 samples in 2 shards, 2 classes, grid 8x8, codebook 16" in caplog.text
    assert "start-up model: GPT (custom size: 2 layers, 2 heads, dim 64), 10 classes, registers mutor2d" in caplog.text
    assert (
        "start-up run: steps 0 -> 2 (2 to train); global batch 16 = micro 8 x 1 rank x 2 accumulation; "
        "device cpu, precision fp32, compile off"
    ) in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("the model has 10 classes (model.num_classes), the data 2") for w in warnings)
    # Log lines start their own line (tqdm.write), never glued to the progress bar.
    logged = [line.split("\r")[-1] for line in err.splitlines() if "loss_ntp=" in line]
    assert len(logged) == 2 and all(line.startswith("step ") for line in logged), logged
    # Resuming the finished run says so, with the checkpoint it ended with.
    finished = f"already completed at step 2 (checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step_00000002'})"
    assert finished in caplog.text and "checkpoint: None" not in caplog.text
    assert "start-up run: steps 2 -> 2 (nothing left to train)" in caplog.text


def test_save_every_changes_nothing_trained_and_a_resume_inside_a_data_segment_is_exact(tmp_path, shards, caplog):
    # Data segments of 8 steps (re-seeded at 0, 8, 16): checkpoints every 10 or 20 steps train the same
    # weights bit for bit, and resuming at 10 (inside the segment 8-16) replays it to the same end.
    import logging

    args = ["steps=20", "data.segment_steps=8", "global_batch_size=8", "micro_batch_size=4", "log_every=20"]
    ten = train(config(tmp_path / "a", shards, *args, "save_every=10"))
    twenty = train(config(tmp_path / "b", shards, *args, "save_every=20"))
    assert ten.losses == twenty.losses
    a, b = exported(tmp_path / "a" / "run", 20), exported(tmp_path / "b" / "run", 20)
    assert all(torch.equal(a[k], b[k]) for k in a)
    caplog.set_level(logging.INFO)
    checkpoint = tmp_path / "a" / "run" / "checkpoints" / "step_00000010"
    resumed = train(config(tmp_path / "a", shards, *args, "save_every=10"), resume=str(checkpoint))
    assert resumed.losses == ten.losses[10:]
    again = exported(tmp_path / "a" / "run", 20)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert "resumed on" not in caplog.text  # the same number of ranks: nothing to say


def test_a_resume_on_another_number_of_ranks_says_so(tmp_path, shards, caplog):
    import logging

    from mutor_vision.training.resume import rank_change_note

    cmd = ["train_c2i.py", "--config", str(TINY), f"data.root={shards}", f"out_dir={tmp_path / 'run'}", "steps=2"]
    result = run_two_cpu_ranks([*cmd, "save_every=2", "tensorboard=false"])
    assert result.returncode == 0, result.stderr[-4000:]
    caplog.set_level(logging.INFO)
    resumed = train(config(tmp_path, shards, "steps=4", "save_every=2"), resume="auto", allow_change=["steps"])
    assert resumed.reason == "completed" and resumed.step == 4
    line = (
        "resumed on 1 rank (written by 2): data order differs from an uninterrupted run; "
        "model, optimizer and schedule exact"
    )
    assert [r.getMessage() for r in caplog.records].count(line) == 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 1 and state["accumulation"] == 2  # the global batch kept: 16 = 8 × 1 × 2
    assert rank_change_note(1, 2).startswith("resumed on 2 ranks (written by 1): ")
    assert rank_change_note(2, 2) is None and rank_change_note(None, 2) is None  # older checkpoints: unknown


def test_warmup_linear_is_the_authors_schedule():
    # The MuToR authors' text recipe: Hugging Face's linear schedule with ceil(0.1 x total) warm-up
    # steps from factor 0. A worked example: 3,735 steps -> 374 warm-up steps.
    from mutor_vision.training.loop_config import OptimConfig
    from mutor_vision.training.optim import lr_factor

    config = OptimConfig(lr=5e-5, schedule="warmup_linear", warmup_ratio=0.1)
    total, warmup = 3735, 374

    def authors(step: int) -> float:  # transformers' get_linear_schedule_with_warmup, written out
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    for step in (0, 1, 100, 373, 374, 375, 2000, 3734):
        assert lr_factor(step, config, total) == pytest.approx(authors(step), abs=1e-12), step
    assert lr_factor(0, config, total) == 0.0 and lr_factor(374, config, total) == 1.0
