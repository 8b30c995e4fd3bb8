"""After training: sample_c2i.py (chosen classes, a labelled grid), eval/fid.py's CFG sweep, the
LlamaGen-form export and the model card (export_c2i.py), GPT.from_pretrained with a Hub id, every
command's --help, and a tracker that is not installed."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import COLORS, ROOT, make_image_folder
from PIL import Image

import export_c2i
import sample_c2i
from eval import fid as fid_cli
from mutor_vision.evaluation import INCEPTION_FILE, save_random_inception_weights
from mutor_vision.models import GPT, GPTConfig, RegisterConfig
from mutor_vision.models.checkpoint import REGISTER_KEY, CheckpointError, save_export
from tokenizer import PaletteTokenizer


def tiny_export(folder: Path, seed: int = 0, classes: int = 10) -> Path:
    """A tiny MuToR-1D export (it can draft) with the palette tokenizer and class names recorded."""
    torch.manual_seed(seed)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=64, vocab_size=len(COLORS), num_classes=classes, grid_size=8,
        registers=RegisterConfig(mode="mutor1d", d_max=3, num_registers=None),
    )  # fmt: skip
    model = GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    palette = PaletteTokenizer(COLORS)
    folder.mkdir(parents=True, exist_ok=True)
    palette.save(folder / "palette.json")
    record = {"kind": "palette", "path": str(folder / "palette.json"), "checksum": palette.checksum}
    data = {"num_classes": classes, "classes": [f"digit{c}" for c in range(classes)]}
    save_export(folder / "export", model.state_dict(), model.config, tokenizer=record, data=data)
    return folder / "export"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


# ---------------------------------------------------------------- sample_c2i.py


def test_sample_c2i_draws_chosen_classes_into_a_labelled_grid_whatever_the_batch_size(tmp_path, export):
    start = time.perf_counter()
    record = sample_c2i.run(["--ckpt", str(export), "--classes", "0,3,7", "--per-class", "2", "--out",
                             str(tmp_path / "a"), "--batch-size", "6"])  # fmt: skip
    seconds = time.perf_counter() - start
    assert record["classes"] == [0, 3, 7] and record["files"][0] == "0000_class0.png" and len(record["files"]) == 6
    assert record["sampling"]["cfg_scale"] == 4.0 and record["sampling"]["top_k"] == 2000  # LlamaGen's defaults
    first = pngs(tmp_path / "a")
    assert list(first) == record["files"]
    assert Image.open(tmp_path / "a" / "0002_class3.png").size == (8, 8)
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.height >= 3 * 64 and grid.width > 2 * 64  # 3 labelled rows of 2, enlarged to >= 64 px
    assert json.loads((tmp_path / "a" / "samples.json").read_text()) == record
    # Image i comes from (seed, i): other batches, the same bytes; another seed, other images.
    sample_c2i.run(["--ckpt", str(export), "--classes", "0,3,7", "--per-class", "2", "--out",
                    str(tmp_path / "b"), "--batch-size", "4"])  # fmt: skip
    assert pngs(tmp_path / "b") == first
    sample_c2i.run(["--ckpt", str(export), "--classes", "0,3,7", "--per-class", "2", "--out",
                    str(tmp_path / "c"), "--seed", "1"])  # fmt: skip
    assert pngs(tmp_path / "c") != first
    assert seconds < 60, seconds  # seconds on a CPU; the bound only catches a hang


def test_sample_c2i_drafting_greedy_equals_plain_greedy(tmp_path, export):
    common = ["--ckpt", str(export), "--classes", "1,2", "--per-class", "3", "--temperature", "0"]
    sample_c2i.run([*common, "--out", str(tmp_path / "plain")])
    sample_c2i.run([*common, "--out", str(tmp_path / "drafted"), "--draft-tokens", "3"])
    assert pngs(tmp_path / "plain") == pngs(tmp_path / "drafted")


def test_sample_c2i_refuses_bad_class_lists_in_one_line_writing_nothing(tmp_path, export, capsys):
    for classes in ("0,10", "", "1,,2", "a", "-1"):
        out = tmp_path / f"out{len(classes)}"
        assert sample_c2i.main(["--ckpt", str(export), "--classes", classes, "--out", str(out)]) == 2, classes
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--classes" in err, err
        assert not out.exists()
    assert sample_c2i.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 4
    assert "no such checkpoint" in capsys.readouterr().err


def test_sample_c2i_default_classes():
    assert sample_c2i.parse_classes(None, 1000) == [207, 360, 387, 974, 88, 979, 417, 279]  # LlamaGen's demo list
    assert sample_c2i.parse_classes(None, 10) == list(range(8))
    assert sample_c2i.parse_classes(" 4, 2 ,4", 10) == [4, 2, 4]
    assert sample_c2i.row_label(3, ["a", "b", "c", "d"]) == "3 d" and sample_c2i.row_label(3, None) == "3"


# ---------------------------------------------------------------- the CFG sweep


def sweep_args(export: Path, out: Path, weights: Path, reference: Path, *extra: str) -> list[str]:
    return [
        "--ckpt", str(export), "--num-samples", "6", "--batch-size", "3", "--ref-folder", str(reference),
        "--ref-cache", str(out.parent / "cache"), "--inception-weights", str(weights), "--out", str(out),
        "--device", "cpu", "--no-npz", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("reference") / "images", classes=3, per_class=2)


def test_cfg_sweep_writes_its_table_and_plot_resumes_and_equals_single_runs(tmp_path, export, inception_weights,
                                                                            reference):  # fmt: skip
    argv = sweep_args(export, tmp_path / "sweep", inception_weights, reference, "--cfg-scales", "1,3")
    summary = fid_cli.run(argv)
    rows = {row["cfg_scale"]: row for row in summary["rows"]}
    assert set(rows) == {1.0, 3.0} and summary["best"] == min(rows.values(), key=lambda row: row["fid"])
    best = summary["best"]["cfg_scale"]
    assert (
        f"--cfg-scale {best:g} --num-samples 50000" in summary["full_run"] and "--cfg-scales" not in summary["full_run"]
    )
    sweep = tmp_path / "sweep"
    assert json.loads((sweep / "sweep.json").read_text()) == json.loads(json.dumps(summary))
    table = (sweep / "sweep.md").read_text()
    assert "| CFG | FID | IS | precision | recall |" in table and summary["full_run"] in table
    assert Image.open(sweep / "sweep.png").size[0] > 100
    # Each scale is the single run of that scale: the same numbers.
    single = fid_cli.run(sweep_args(export, tmp_path / "single", inception_weights, reference, "--cfg-scale", "3"))
    for key in ("fid", "inception_score", "precision", "recall"):
        assert rows[3.0][key] == single["metrics"][key], key
    # A rerun samples nothing new.
    fid_cli.run(argv)
    for scale in ("1", "3"):
        assert json.loads((sweep / f"cfg_{scale}" / "results.json").read_text())["written_this_run"] == 0


def test_a_sweep_refuses_bad_scales_no_reference_and_another_checkpoints_folder(tmp_path, export, inception_weights,
                                                                                reference, capsys):  # fmt: skip
    for scales in ("1.5,x", "", "2,2", "-1"):
        argv = sweep_args(export, tmp_path / "bad", inception_weights, reference, "--cfg-scales", scales)
        assert fid_cli.main(argv) == 2, scales
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--cfg-scales" in err, err
    argv = sweep_args(export, tmp_path / "bad", inception_weights, reference, "--cfg-scales", "1,2")
    del argv[argv.index("--ref-folder") : argv.index("--ref-folder") + 2]
    assert fid_cli.main(argv) == 2 and "FID" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # cfg_2 holds another checkpoint's samples: refused before cfg_1 samples anything.
    other = tiny_export(tmp_path / "other", seed=5)
    fid_cli.run(sweep_args(other, tmp_path / "sweep" / "cfg_2", inception_weights, reference, "--cfg-scale", "2"))
    before = sorted(p.relative_to(tmp_path / "sweep") for p in (tmp_path / "sweep").rglob("*") if ".lock" not in p.name)
    argv = sweep_args(export, tmp_path / "sweep", inception_weights, reference, "--cfg-scales", "1,2")
    assert fid_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cfg_2 holds outputs made with other settings" in err and "model.checksum" in err, err
    after = sorted(p.relative_to(tmp_path / "sweep") for p in (tmp_path / "sweep").rglob("*") if ".lock" not in p.name)
    assert after == before and not (tmp_path / "sweep" / "cfg_1").exists()


# ---------------------------------------------------------------- handing the model on


def test_the_llamagen_form_loads_back_through_the_official_path_to_identical_logits(tmp_path, export):
    model = GPT.from_pretrained(export).eval()
    model.save_llamagen(tmp_path / "llamagen.pt")
    saved = torch.load(tmp_path / "llamagen.pt", map_location="cpu", weights_only=True)  # as LlamaGen's scripts
    assert list(saved) == ["model"] and set(saved["model"]) == set(model.state_dict()) - {REGISTER_KEY}
    architecture = {k: v for k, v in vars(model.config).items() if k not in ("size", "registers")}
    # LlamaGen's file knows nothing of registers: loaded as a next-token model of the same architecture.
    back = GPT.from_pretrained(tmp_path / "llamagen.pt", size=None, registers={"mode": "ntp"}, **architecture).eval()
    tokens, labels = torch.randint(0, len(COLORS), (3, 64), generator=torch.Generator().manual_seed(0)), torch.arange(3)
    with torch.no_grad():
        assert torch.equal(back(tokens, labels).logits, model(tokens, labels).logits)


def test_export_c2i_writes_the_card_weights_and_llamagen_file_and_checks_the_results(tmp_path, export,
                                                                                     inception_weights, reference,
                                                                                     capsys):  # fmt: skip
    evaluated = fid_cli.run(sweep_args(export, tmp_path / "eval", inception_weights, reference))
    release = tmp_path / "release"
    done = export_c2i.run(["--ckpt", str(export), "--out", str(release), "--results", str(tmp_path / "eval" /
                           "results.json"), "--hub-id", "someone/tiny-mutor"])  # fmt: skip
    assert set(done["files"]) == {"README.md", "config.json", "data.json", "llamagen.pt", "model.safetensors",
                                  "tokenizer.json"}  # fmt: skip
    card = (release / "README.md").read_text()
    assert "MuToR-1D: a register per slot, offsets 1..3" in card and "## Evaluation" in card
    assert f"{evaluated['metrics']['fid']:.3f}" in card and 'GPT.from_pretrained("someone/tiny-mutor")' in card
    assert "llamagen.pt" in card and "registers at inference | none" in card
    tokens, labels = torch.randint(0, len(COLORS), (2, 64)), torch.tensor([1, 2])
    with torch.no_grad():
        expected = GPT.from_pretrained(export).eval()(tokens, labels).logits
        assert torch.equal(GPT.from_pretrained(release).eval()(tokens, labels).logits, expected)
    # Results of other weights are refused, naming the file.
    other = tiny_export(tmp_path / "other", seed=3)
    argv = ["--ckpt", str(other), "--out", str(tmp_path / "r2"), "--results", str(tmp_path / "eval" / "results.json")]
    assert export_c2i.main(argv) == 4 and "measured other weights" in capsys.readouterr().err


def test_a_training_export_carries_its_card_and_training_record(tmp_path):
    from mutor_vision.config import load_yaml
    from mutor_vision.shards import write_synthetic_shards
    from mutor_vision.training.c2i import train
    from mutor_vision.training.config import TrainConfig

    write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=8, grid=8, vocab_size=16, num_classes=10)
    overrides = [f"data.root={tmp_path / 'shards'}", f"out_dir={tmp_path / 'run'}", "tensorboard=false", "steps=2",
                 "save_every=2"]  # fmt: skip
    train(load_yaml(TrainConfig, ROOT / "configs" / "c2i" / "tiny_cpu.yaml", overrides))
    export = tmp_path / "run" / "checkpoints" / "step_00000002" / "export"
    training = json.loads((export / "training.json").read_text())
    assert training["step"] == 2 and training["steps"] == 2 and training["global_batch_size"] == 16
    card = (export / "README.md").read_text()
    assert card.startswith("# run, step 2") and "MuToR-2D: 20 registers" in card and "step 2 of 2" in card


def test_a_hub_id_offline_fails_in_seconds_naming_the_id_and_the_cache_then_loads_from_it(
    tmp_path, export, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        GPT.from_pretrained("someone/tiny-mutor")
    message = str(caught.value)
    assert time.perf_counter() - start < 5
    assert "someone/tiny-mutor" in message and str(tmp_path / "hub") in message and "HF_HUB_OFFLINE=1" in message
    assert len(message.splitlines()) == 1
    # The same id in the local cache (a snapshot as huggingface_hub lays it out) loads offline.
    repo = tmp_path / "hub" / "models--someone--tiny-mutor"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).write_bytes((export / name).read_bytes())
    model = GPT.from_pretrained("someone/tiny-mutor")
    assert torch.equal(model.output.weight, GPT.from_pretrained(export).output.weight)


# ---------------------------------------------------------------- command lines


def parsers():
    import train_c2i
    from demo import run_demo, run_demo_text
    from mutor_vision.cli import train_parser
    from mutor_vision.text import tiny
    from mutor_vision.text.evaluate import benchmark_parser
    from tokenizer import encode_imagenet

    gsm8k, math500 = (__import__(f"eval.{name}", fromlist=["x"]) for name in ("gsm8k", "math500"))
    return {
        "train_c2i.py": train_parser(train_c2i.__doc__, "train_c2i"),
        "eval/fid.py": fid_cli.make_parser(),
        "sample_c2i.py": sample_c2i.make_parser(),
        "export_c2i.py": export_c2i.make_parser(),
        "tokenizer/encode_imagenet.py": encode_imagenet.make_parser(),
        "eval/gsm8k.py": benchmark_parser(gsm8k.__doc__, gsm8k.GSM8K),
        "eval/math500.py": benchmark_parser(math500.__doc__, math500.MATH500),
        "mutor_vision.text.tiny": tiny.make_parser(),
        "demo/run_demo.py": run_demo.make_parser(),
        "demo/run_demo_text.py": run_demo_text.make_parser(),
    }


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from mutor_vision.cli import HelpFormatter

    for command, parser in parsers().items():
        assert parser.formatter_class is HelpFormatter, command
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{command} {action.option_strings or action.dest}: no help text"
        text = parser.format_help()
        assert "(default:" in text, command
    assert "(default: 64)" in fid_cli.make_parser().format_help()  # --batch-size


def test_a_tracker_that_is_not_installed_stops_the_start_naming_its_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    import train_c2i
    from mutor_vision.shards import write_synthetic_shards

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=8, grid=8, vocab_size=16, num_classes=10)
    argv = ["--config", str(ROOT / "configs" / "c2i" / "tiny_cpu.yaml"), f"data.root={tmp_path / 'shards'}",
            f"out_dir={tmp_path / 'run'}", "wandb=true"]  # fmt: skip
    assert train_c2i.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb" in err and '".[wandb]"' in err, err
    assert not (tmp_path / "run").exists()
