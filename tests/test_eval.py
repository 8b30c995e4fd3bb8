"""Evaluation: metric maths against independent computations, and the eval/fid.py pipeline."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import COLORS, make_image_folder, run_two_cpu_ranks

from mutor_vision.errors import ConfigError
from mutor_vision.evaluation import (
    INCEPTION_FILE,
    frechet_distance,
    inception_extractor,
    inception_score,
    precision_recall,
    save_random_inception_weights,
    statistics,
)
from mutor_vision.models import GPT, GPTConfig, RegisterConfig
from mutor_vision.models.checkpoint import save_export
from tokenizer import PaletteTokenizer, to_uint8

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))
import fid as fid_cli  # noqa: E402


def test_fid_against_own_statistics_is_zero():
    features = np.random.default_rng(0).normal(size=(2000, 32))
    stats = statistics(features)
    assert abs(frechet_distance(stats, stats)) < 1e-6


def test_fid_equals_scipy_on_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16)) + 0.5
    b = rng.normal(size=(3000, 16)) * 1.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(statistics(a), statistics(b)) == pytest.approx(expected, rel=1e-6)
    # ADM's reference statistics may be float32: the comparison still runs in float64.
    ref = {k: v.astype(np.float32) for k, v in statistics(b).items()}
    assert frechet_distance(statistics(a), ref) == pytest.approx(expected, rel=1e-4)


def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)
    # One-hot-ish logits over 10 classes, all classes equally used: IS -> 10.
    logits = np.full((1000, 10), -50.0)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0
    assert inception_score(logits)[0] == pytest.approx(10.0, rel=1e-6)


def test_precision_recall_identical_and_disjoint():
    features = np.random.default_rng(2).normal(size=(300, 8))
    assert precision_recall(features, features) == (1.0, 1.0)
    far = features + 100.0
    assert precision_recall(far, features) == (0.0, 0.0)
    # Half the samples on the manifold: precision about 1/2, recall stays high.
    half = np.concatenate([features[:150], far[:150]])
    precision, recall = precision_recall(half, features)
    assert precision == pytest.approx(0.5, abs=0.02) and recall > 0.5


def test_precision_recall_equals_a_brute_force_computation():
    # The k-NN manifold definition written out with full distance matrices (no chunks).
    rng = np.random.default_rng(3)
    fake, real = rng.normal(size=(230, 6)), rng.normal(size=(170, 6)) * 1.3 + 0.4

    def coverage(queries, manifold, k=3):
        radii = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=-1), axis=1)[:, k]
        distances = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
        return float((distances <= radii[None]).any(axis=1).mean())

    precision, recall = precision_recall(fake, real, k=3, chunk=64)
    # torch-fidelity averages in float32: equal up to rounding, far below one sample (1/230)
    assert precision == pytest.approx(coverage(fake, real), abs=1e-6)
    assert recall == pytest.approx(coverage(real, fake), abs=1e-6)
    assert 0.2 < precision < 1.0 and 0.2 < recall < 1.0


def test_offline_inception_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as error:
        inception_extractor(None)
    message = str(error.value)
    assert "--inception-weights" in message and str(tmp_path / "torch_home") in message and INCEPTION_FILE in message


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception with random weights, saved as a weights file (numbers not reportable)."""
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny trained-shape export with the palette tokenizer recorded beside it."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=64, vocab_size=len(COLORS), num_classes=3, grid_size=8,
        registers=RegisterConfig(mode="ntp"),
    )  # fmt: skip
    model = GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    palette = PaletteTokenizer(COLORS)
    palette.save(root / "palette.json")
    record = {"kind": "palette", "path": str(root / "palette.json"), "checksum": palette.checksum}
    save_export(root / "export", model.state_dict(), model.config, tokenizer=record)
    make_image_folder(root / "reference", classes=3, per_class=2)
    return root


def cli_args(export: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "--ckpt", str(export / "export"), "--num-samples", "12", "--batch-size", "4", "--cfg-scale", "1.5",
        "--ref-folder", str(export / "reference"), "--ref-cache", str(out.parent / "cache"),
        "--inception-weights", str(weights), "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_interrupted_eval_resumes_every_index_once(tmp_path, export, inception_weights, monkeypatch):
    from mutor_vision.evaluation import run as evaluation_run

    original, calls = evaluation_run.generate, {"n": 0}

    def dying_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed while sampling")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_run, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        fid_cli.run(cli_args(export, tmp_path / "run", inception_weights))
    monkeypatch.undo()
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [f"{i:06d}.png" for i in range(8)]
    results = fid_cli.run(cli_args(export, tmp_path / "run", inception_weights))
    assert sorted(p.name for p in samples.iterdir()) == [f"{i:06d}.png" for i in range(12)]
    assert results["written_this_run"] == 4 and results["num_samples"] == 12
    assert set(results["metrics"]) == {"fid", "precision", "recall", "inception_score", "inception_score_std"}
    assert all(np.isfinite(v) for v in results["metrics"].values())
    with np.load(tmp_path / "run" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert np.array_equal(np.load(tmp_path / "run" / "labels.npy"), np.arange(12) % 3)
    assert (tmp_path / "run" / "grid.png").is_file()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["sampling"]["cfg_scale"] == 1.5 and saved["tokenizer"]["kind"] == "palette"
    assert list((tmp_path / "cache").glob("reference-*-8px-adm-center-crop-inception-v3-compat.npz"))
    # Other settings into the same folder: refused, never mixed.
    with pytest.raises(ValueError, match="cfg_scale"):  # argparse keeps the last --cfg-scale
        fid_cli.run(cli_args(export, tmp_path / "run", inception_weights, "--cfg-scale", "3.0"))


def test_two_rank_eval_covers_every_label_once(tmp_path, export, inception_weights):
    result = run_two_cpu_ranks(["eval/fid.py", *cli_args(export, tmp_path / "run", inception_weights, "--no-npz")])
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["per_rank"] == [6, 6] and results["written_this_run"] == 12
    names = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)]  # every index (so every label) exactly once


def test_refilled_samples_equal_an_uninterrupted_run(tmp_path, export, inception_weights, monkeypatch):
    # Killed while writing the 6th PNG (mid-batch, writer threads still busy): the rerun samples the
    # gaps in other batches, yet every PNG equals the uninterrupted run's, because sample i's random
    # numbers come from (seed, i).
    from mutor_vision.evaluation import samples as evaluation_samples

    straight = fid_cli.run(cli_args(export, tmp_path / "a", inception_weights, "--no-npz"))
    original, calls = evaluation_samples.atomic_write, {"n": 0}

    def dying_write(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed mid-batch")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(evaluation_samples, "atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        fid_cli.run(cli_args(export, tmp_path / "b", inception_weights, "--no-npz"))
    monkeypatch.undo()
    before = len(list((tmp_path / "b" / "samples").glob("*.png")))
    assert 5 <= before < 12
    resumed = fid_cli.run(cli_args(export, tmp_path / "b", inception_weights, "--no-npz"))
    assert resumed["written_this_run"] == 12 - before
    for i in range(12):
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / "samples" / name).read_bytes() == (tmp_path / "b" / "samples" / name).read_bytes()
    for key, value in straight["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_in_memory_features_equal_the_png_files_features(tmp_path, export, inception_weights):
    # PNG is lossless: features computed from the decoded images in memory (this run's samples)
    # equal those read back from the files (a rerun's kept samples), batch for batch.
    from mutor_vision.evaluation import inception_extractor
    from mutor_vision.evaluation.run import sample_and_measure
    from mutor_vision.models import SamplingConfig

    model = GPT.from_pretrained(export / "export").eval()
    palette = PaletteTokenizer(COLORS)
    extractor = inception_extractor(inception_weights)
    args = (model, lambda codes: to_uint8(palette.decode(codes)), extractor, np.arange(12) % 3, range(12),
            tmp_path / "samples", SamplingConfig(cfg_scale=1.5), 4, 4)  # fmt: skip
    from_memory, written = sample_and_measure(*args, show_progress=False)
    from_files, rewritten = sample_and_measure(*args, show_progress=False)
    assert (written, rewritten) == (12, 0)
    assert all(np.array_equal(a, b) for a, b in zip(from_memory, from_files, strict=True))
    assert from_memory[0].shape == (12, 2048) and from_memory[0].dtype == np.float32


def test_a_corrupt_png_is_sampled_again(tmp_path, export, inception_weights):
    args = cli_args(export, tmp_path / "run", inception_weights, "--no-npz")
    first = fid_cli.run(args)
    target = tmp_path / "run" / "samples" / "000007.png"
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])  # truncated: present, but it does not decode
    again = fid_cli.run(args)
    assert again["written_this_run"] == 1 and target.read_bytes() == good
    for key, value in first["metrics"].items():
        assert again["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_a_failed_run_without_samples_does_not_block_other_settings(tmp_path, export, inception_weights, monkeypatch):
    from mutor_vision.evaluation import run as evaluation_run

    def failing_generate(*args, **kwargs):
        raise RuntimeError("NaN weights")

    monkeypatch.setattr(evaluation_run, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="NaN"):
        fid_cli.run(cli_args(export, tmp_path / "run", inception_weights, "--no-npz"))
    monkeypatch.undo()
    assert (tmp_path / "run" / "sampling_settings.json").is_file()
    results = fid_cli.run(cli_args(export, tmp_path / "run", inception_weights, "--no-npz", "--cfg-scale", "3.0"))
    assert results["sampling"]["cfg_scale"] == 3.0 and results["written_this_run"] == 12


def test_samples_of_older_code_are_kept_when_new_keys_keep_their_defaults(tmp_path, export, inception_weights):
    # A stamp written before draft_tokens and model.head_chunk_size existed: same settings, kept.
    args = cli_args(export, tmp_path / "run", inception_weights, "--no-npz")
    fid_cli.run(args)
    stamp = tmp_path / "run" / "sampling_settings.json"
    recorded = json.loads(stamp.read_text())
    del recorded["draft_tokens"], recorded["model"]["config"]["head_chunk_size"]
    stamp.write_text(json.dumps(recorded))
    assert fid_cli.run(args)["written_this_run"] == 0
    assert "draft_tokens" in json.loads(stamp.read_text())  # brought up to date
    recorded["top_k"] = 7  # a setting that did change still refuses
    stamp.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match="top_k"):
        fid_cli.run(args)


def test_eval_cli_checks_the_checkpoint_first(tmp_path, capsys):
    argv = ["--ckpt", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]
    assert fid_cli.main(argv) == 4
    err = capsys.readouterr().err
    assert "nonexistent: no such checkpoint" in err and "Inception" not in err and "Traceback" not in err


def test_eval_with_register_drafting(tmp_path, export, inception_weights, capsys):
    # The fixture's model was trained without registers: drafting is refused at once, naming why.
    assert fid_cli.main(cli_args(export, tmp_path / "run", inception_weights, "--draft-tokens", "2")) == 2
    assert "trained without registers" in capsys.readouterr().err
    torch.manual_seed(0)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=64, vocab_size=len(COLORS), num_classes=3, grid_size=8,
        registers=RegisterConfig(mode="mutor2d", d_max_2d=3, num_registers=None),
    )  # fmt: skip
    model = GPT(config)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    record = json.loads((export / "export" / "tokenizer.json").read_text())
    save_export(tmp_path / "mutor" / "export", model.state_dict(), config, tokenizer=record)
    shutil.copytree(export / "reference", tmp_path / "mutor" / "reference")
    # D = 3 trains the raster offsets 1 and 2 along a row: drafting one token ahead (k = 2).
    results = fid_cli.run(cli_args(tmp_path / "mutor", tmp_path / "run", inception_weights, "--draft-tokens", "2"))
    assert results["drafting"]["draft_tokens"] == 2 and results["drafting"]["tokens_per_forward"] >= 1.0
    assert results["written_this_run"] == 12 and all(np.isfinite(v) for v in results["metrics"].values())
