"""Evaluation: metric maths against independent computations, and the eval/fid.py pipeline."""

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import COLORS, make_image_folder, run_two_cpu_ranks
from PIL import Image

from eval import fid as fid_cli
from eval.common import resolve_tokenizer
from mutor_vision.errors import ConfigError, InputError
from mutor_vision.evaluation import (
    INCEPTION_FILE,
    EvalConfig,
    frechet_distance,
    inception_extractor,
    inception_score,
    precision_recall,
    save_random_inception_weights,
    statistics,
)
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig
from mutor_vision.models.checkpoint import save_export
from tokenizer import PaletteTokenizer, to_uint8

ROOT = Path(__file__).resolve().parent.parent


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
        "--inception-weights", str(weights), "--out", str(out), "--device", "cpu", "--per-class", *extra,
    ]  # fmt: skip


def kill_generate_at_call(monkeypatch, evaluation_run, call: int) -> None:
    """Make the evaluation's ``generate`` raise KeyboardInterrupt at its ``call``-th call (killed while sampling)."""
    original, calls = evaluation_run.generate, {"n": 0}

    def dying_generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("killed while sampling")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_run, "generate", dying_generate)


def test_interrupted_eval_resumes_every_index_once(tmp_path, export, inception_weights, monkeypatch):
    from mutor_vision.evaluation import run as evaluation_run

    kill_generate_at_call(monkeypatch, evaluation_run, 3)
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
    assert len(list((tmp_path / "cache").glob("reference-*.npz"))) == 1
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

    model = GPT.from_pretrained(export / "export").eval()
    palette = PaletteTokenizer(COLORS)
    extractor = inception_extractor(inception_weights)
    config = EvalConfig(tmp_path, sampling=SamplingConfig(cfg_scale=1.5), batch_size=4, feature_batch_size=4)
    args = (model, lambda codes: to_uint8(palette.decode(codes)), extractor, np.arange(12) % 3, range(12), config)
    from_memory = sample_and_measure(*args, show_progress=False)
    from_files = sample_and_measure(*args, show_progress=False)
    assert (from_memory.written, from_files.written) == (12, 0)
    assert np.array_equal(from_memory.indices, np.arange(12))
    assert all(np.array_equal(a, b) for a, b in zip(from_memory.features, from_files.features, strict=True))
    assert from_memory.features[0].shape == (12, 2048) and from_memory.features[0].dtype == np.float32


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


def test_eval_cli_reports_every_missing_input_together_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception in the hub cache
    argv = ["--ckpt", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]
    argv += ["--ref-batch", str(tmp_path / "ref.npz"), "--tokenizer-path", str(tmp_path / "vq.pt")]
    assert fid_cli.main(argv) == 4
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "eval/fid.py: 4 inputs are missing or unreadable:", err
    assert "--ckpt" in lines[1] and "nonexistent: no such checkpoint" in lines[1]
    assert "--tokenizer-path" in lines[2] and "vq.pt: no such file" in lines[2]
    assert "--ref-batch" in lines[3] and "ref.npz: no such file" in lines[3]
    assert "--inception-weights" in lines[4] and len(lines) == 5
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # nothing was started


def test_a_lone_missing_input_is_one_line(tmp_path, export, inception_weights, capsys):
    argv = cli_args(export, tmp_path / "run", inception_weights, "--tokenizer-path", str(tmp_path / "none.json"))
    assert fid_cli.main(argv) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer-path" in err and "none.json: no such file" in err


def test_a_non_adm_npz_names_the_flag_and_what_it_lacks(tmp_path, export, inception_weights, capsys):
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    argv = cli_args(export, tmp_path / "run", inception_weights)
    argv[argv.index("--ref-folder") : argv.index("--ref-folder") + 2] = ["--ref-batch", str(tmp_path / "images.npz")]
    assert fid_cli.main(argv) == 4
    err = capsys.readouterr().err
    assert "--ref-batch" in err and "lacks mu and sigma" in err and "arr_0" in err and "Traceback" not in err


class TinyExtractor(torch.nn.Module):
    """A stand-in feature extractor (random projection of the pixels): the cache logic is the same, in ms."""

    name = "tiny"  # every instance has the same name: only its weights tell two apart

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.projection = torch.nn.Parameter(torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1) @ self.projection


def reference(folder: Path, extractor, cache: Path):
    from mutor_vision.evaluation import reference_from_folder
    from tokenizer import center_crop_adm

    return reference_from_folder(folder, 8, center_crop_adm, extractor, 16, "cpu", cache)


def test_other_weights_or_other_images_never_reuse_cached_reference_features(tmp_path, export):
    folder = tmp_path / "reference"
    shutil.copytree(export / "reference", folder)
    cache = tmp_path / "cache"
    w0, w1 = TinyExtractor(0), TinyExtractor(1)
    first = reference(folder, w0, cache)
    again = reference(folder, w0, cache)  # from the cache: the same features
    assert np.array_equal(first.features, again.features) and len(list(cache.iterdir())) == 1
    other = reference(folder, w1, cache)  # other weights, same extractor name: computed anew
    assert len(list(cache.iterdir())) == 2
    assert np.array_equal(other.features, reference(folder, w1, tmp_path / "fresh").features)
    assert not np.allclose(other.features, first.features)
    with torch.no_grad():  # weights changed in place: a miss too
        w0.projection[0, 0] += 1
    assert not np.array_equal(reference(folder, w0, cache).features, first.features)
    assert len(list(cache.iterdir())) == 3
    # The same file names and sizes, other pixels: the reference's content decides, not its listing.
    image = next(folder.rglob("*.png"))
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    changed = reference(folder, w1, cache)
    assert changed.sha256 != other.sha256 and len(list(cache.iterdir())) == 4
    # A cache file whose recorded key is not this evaluation's (renamed, or a hash collision) is not served.
    for entry in cache.iterdir():
        entry.unlink()
    reference(folder, w1, cache)
    (entry,) = cache.iterdir()
    np.savez(entry, features=np.zeros((6, 16), np.float32), key=np.array("{}"), skipped=np.array(0))
    assert np.array_equal(reference(folder, w1, cache).features, changed.features)


def test_results_record_weights_reference_tokenizer_package_and_skipped_images(
    tmp_path, export, inception_weights, caplog
):
    from mutor_vision import __version__
    from mutor_vision.files import file_sha256

    # A reference folder with an unreadable image: skipped, named in the log and counted.
    folder = tmp_path / "mine" / "reference"
    shutil.copytree(export / "reference", folder)
    (folder / "n00000000" / "broken.png").write_bytes(b"not a png")
    shutil.copytree(export / "export", tmp_path / "mine" / "export")
    with caplog.at_level("WARNING"):
        results = fid_cli.run(cli_args(tmp_path / "mine", tmp_path / "run", inception_weights))
    assert "broken.png" in caplog.text and all(np.isfinite(v) for v in results["metrics"].values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["package"] == {"name": "mutor-vision", "version": __version__}
    features = saved["features"]
    assert features["weights_sha256"] == file_sha256(inception_weights) and features["random_weights"] is False
    assert len(features["state_dict_sha256"]) == 64 and features["features_version"] >= 2
    assert saved["reference"]["skipped_images"] == 1 and len(saved["reference"]["sha256"]) == 64
    assert saved["tokenizer"]["sha256"] == PaletteTokenizer(COLORS).checksum
    assert saved["sampling"] | {"cfg_scale": 1.5, "temperature": 1.0, "num_classes": 3} == saved["sampling"]
    assert "warning" not in saved


def test_random_inception_weights_run_the_pipeline_and_say_the_numbers_mean_nothing(tmp_path, export, caplog):
    argv = cli_args(export, tmp_path / "run", Path("unused"))
    argv[argv.index("--inception-weights") + 1] = "random:0"
    with caplog.at_level("WARNING"):
        results = fid_cli.run(argv)
    assert results["features"]["random_weights"] is True and results["features"]["weights"] == "random:0"
    assert "meaningless" in results["warning"] and "RANDOM" in caplog.text
    assert all(np.isfinite(v) for v in results["metrics"].values())
    argv[argv.index("--inception-weights") + 1] = "random:x"
    assert fid_cli.main(argv) == 2


def test_the_tokenizer_kind_is_told_by_its_file(tmp_path, export, inception_weights):
    from tokenizer import load_tokenizer, tokenizer_kind

    # An export without a tokenizer record: --vq-ckpt (the old name) given a palette file works unaided.
    model = GPT.from_pretrained(export / "export")
    save_export(tmp_path / "bare" / "export", model.state_dict(), model.config)
    shutil.copytree(export / "reference", tmp_path / "bare" / "reference")
    palette = str(export / "palette.json")
    argv = cli_args(tmp_path / "bare", tmp_path / "run", inception_weights, "--vq-ckpt", palette)
    args = fid_cli.make_parser().parse_args(argv)
    fid_cli.check_all_inputs(args)
    kind, path, _ = resolve_tokenizer(args)
    assert kind is None and path == palette and tokenizer_kind(path) == "palette"
    assert isinstance(load_tokenizer(None, path), PaletteTokenizer)
    assert tokenizer_kind(inception_weights) == "vq16"  # a PyTorch checkpoint
    with pytest.raises(InputError, match="--tokenizer-path: required"):
        fid_cli.run(cli_args(tmp_path / "bare", tmp_path / "run2", inception_weights))


def test_evaluation_samples_the_classes_the_training_data_held(tmp_path, export, inception_weights):
    # The model has 3 classes; its training data held 2 (recorded in the export): labels 0 and 1 only.
    model = GPT.from_pretrained(export / "export")
    record = json.loads((export / "export" / "tokenizer.json").read_text())
    data = {"num_classes": 2, "classes": ["n0", "n1"]}
    save_export(tmp_path / "two" / "export", model.state_dict(), model.config, tokenizer=record, data=data)
    shutil.copytree(export / "reference", tmp_path / "two" / "reference")
    argv = cli_args(tmp_path / "two", tmp_path / "run", inception_weights, "--num-samples", "4")
    argv[argv.index("--ref-folder") : argv.index("--ref-folder") + 2] = ["--no-reference"]  # labels are the point
    results = fid_cli.run(argv)
    assert results["sampling"]["num_classes"] == 2
    assert np.array_equal(np.load(tmp_path / "run" / "labels.npy"), np.arange(4) % 2)
    argv = cli_args(tmp_path / "two", tmp_path / "run", inception_weights, "--num-classes", "3")
    assert fid_cli.data_classes(fid_cli.make_parser().parse_args(argv), model) == 3  # the flag wins
    with pytest.raises(ConfigError, match="num_classes 4"):
        fid_cli.run(cli_args(tmp_path / "two", tmp_path / "run4", inception_weights, "--num-classes", "4"))


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


# ---------------------------------------------------------------- decode precision


class TwoFeatures(torch.nn.Module):
    """A fast stand-in extractor with Inception's interface: uint8 (B, 3, 8, 8) -> (pool, logits)."""

    name = "two-features"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool = torch.nn.Parameter(torch.randn(3 * 8 * 8, 16, generator=g))
        self.logits = torch.nn.Parameter(torch.randn(16, 5, generator=g))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.tanh(images.float().flatten(1) / 255 @ self.pool)
        return pool, pool @ self.logits


def test_decode_precision_fp32_is_the_decoder_as_it_is_and_bf16_is_stamped(tmp_path, export, inception_weights):
    from mutor_vision.evaluation import Scoring, evaluate
    from tokenizer import VQ16, VQ16Config, uint8_decoder

    torch.manual_seed(0)
    vq = VQ16(VQ16Config(codebook_size=64, channels=32, channel_mult=(1, 2), z_channels=32, num_res_blocks=1)).eval()
    codes = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        exact = to_uint8(vq.decode(codes).float())
    assert torch.equal(uint8_decoder(vq)(codes), exact)
    half = uint8_decoder(vq, "bf16")(codes)
    assert half.dtype == torch.uint8 and half.shape == exact.shape
    assert (half.int() - exact.int()).abs().float().mean() < 2.0  # close, not equal
    with pytest.raises(ValueError, match="only VQ-16"):
        uint8_decoder(PaletteTokenizer(COLORS), "bf16")
    # Samples decoded in one precision never mix with another's: the stamp records it.
    model = GPT.from_pretrained(export / "export").eval()
    decode = uint8_decoder(PaletteTokenizer(COLORS))
    config = EvalConfig(
        tmp_path / "run", num_samples=4, sampling=SamplingConfig(), batch_size=4, feature_batch_size=4, save_npz=False
    )
    evaluate(model, decode, Scoring(TwoFeatures()), config)
    with pytest.raises(ValueError, match="decode_precision"):
        evaluate(model, decode, Scoring(TwoFeatures()), config.replace(decode_precision="bf16"))


def test_eval_config_is_the_one_source_of_the_stamp_its_defaults_and_the_record(export):
    model = GPT.from_pretrained(export / "export").eval()
    config = EvalConfig("unused", num_samples=12, sampling=SamplingConfig(cfg_scale=1.5, top_k=3)).for_model(model)
    stamp = config.stamp(model)
    settings = ["num_samples", "per_class", "num_classes", "cfg_scale", "temperature", "top_k", "top_p", "seed",
                "cfg_interval"]  # fmt: skip
    assert list(stamp) == [*settings, "draft_tokens", "decode_precision", "model"]
    assert (stamp["num_classes"], stamp["cfg_scale"], stamp["top_k"]) == (3, 1.5, 3)  # None resolved: every class
    assert set(stamp["model"]) == {"config", "checksum"}
    defaults = EvalConfig.stamp_defaults(model)  # what a stamp of older code stands for, key by key
    assert set(stamp) - {"model"} <= set(defaults) and "model.config.grid_size" in defaults
    assert (defaults["num_classes"], defaults["draft_tokens"], defaults["decode_precision"]) == (3, 1, "fp32")
    assert defaults["cfg_interval"] == -1  # a stamp from before the key: every token guided
    record = config.record()
    assert record["num_samples"] == 12 and record["decode_precision"] == "fp32"
    assert record["sampling"] == {**{k: stamp[k] for k in settings[3:]}, "labels": "random", "batch_size": 64,
                                  "num_classes": 3}  # fmt: skip
    with pytest.raises(ConfigError, match=r"num_classes 4: the model has classes 0\.\.2"):
        EvalConfig("unused", num_classes=4).for_model(model)
    for bad, key in [(dict(batch_size=0), "batch_size"), (dict(num_samples=0), "num_samples"),
                     (dict(device="cuda:1"), "device")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            EvalConfig("unused", **bad)


def test_compile_on_the_cpu_samples_eager_and_says_so(tmp_path, export, caplog):
    from mutor_vision.evaluation import Scoring, evaluate
    from tokenizer import uint8_decoder

    model = GPT.from_pretrained(export / "export").eval()
    decode = uint8_decoder(PaletteTokenizer(COLORS))
    config = EvalConfig(tmp_path / "eager", num_samples=4, batch_size=4, feature_batch_size=4, save_npz=False)
    eager = evaluate(model, decode, Scoring(TwoFeatures()), config)
    with caplog.at_level(logging.INFO, logger="mutor_vision.evaluation.run"):
        compiled = evaluate(model, decode, Scoring(TwoFeatures()), config.replace(out_dir=tmp_path / "c", compile=True))
    assert "runs eager" in caplog.text and compiled["metrics"] == eager["metrics"]
    assert model.layers[0].attention.kv_cache is None  # nothing compiled: the eager cache was freed
    for i in range(4):
        name = f"samples/{i:06d}.png"
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


# ---------------------------------------------------------------- the pipeline: overlap, PNG writer, timings


def pipeline_args(export: Path, folder: Path, overlap: bool):
    from tokenizer import uint8_decoder

    model = GPT.from_pretrained(export / "export").eval()
    labels = np.arange(10) % 3
    # 10 samples in batches of 4 (the last one short), features 3 at a time (not a divisor of 4)
    config = EvalConfig(
        folder, sampling=SamplingConfig(cfg_scale=1.5, seed=3), batch_size=4, feature_batch_size=3, overlap=overlap
    )
    return model, uint8_decoder(PaletteTokenizer(COLORS)), TwoFeatures(), labels, range(10), config


def test_the_overlapped_pipeline_writes_and_measures_exactly_what_each_batch_computes(tmp_path, export):
    # Each batch's codes, images and features computed here step by step, independently of the
    # pipeline; the overlapped order (collected one batch late) and the serial order must give
    # exactly these, every index in its place, the short last batch included.
    from mutor_vision.evaluation.run import sample_and_measure
    from mutor_vision.models import generate, sample_uniforms

    args = pipeline_args(export, tmp_path / "overlap", overlap=True)
    model, decode, extractor, labels, _, config = args
    sampling, batch_size, feature_batch = config.sampling, config.batch_size, config.feature_batch_size
    images, pool, logits = [], [], []
    for start in range(0, 10, batch_size):
        batch = list(range(start, min(10, start + batch_size)))
        uniform = sample_uniforms(sampling.seed, batch, model.config.num_tokens)
        batch_images = decode(generate(model, torch.as_tensor(labels[batch]), sampling, uniform=uniform))
        images.append(batch_images.permute(0, 2, 3, 1).numpy())
        for chunk in range(0, len(batch), feature_batch):
            with torch.no_grad():
                p, q = extractor(batch_images[chunk : chunk + feature_batch])
            pool.append(p.numpy())
            logits.append(q.numpy())
    images, pool, logits = np.concatenate(images), np.concatenate(pool), np.concatenate(logits)
    assert len({image.tobytes() for image in images}) == 10  # ten different images: a mix-up would show

    overlapped = sample_and_measure(*args, show_progress=False)
    serial = sample_and_measure(*pipeline_args(export, tmp_path / "serial", overlap=False), show_progress=False)
    assert overlapped.written == 10
    for measured in (overlapped, serial):
        assert np.array_equal(measured.features[0], pool) and np.array_equal(measured.features[1], logits)
    for i in range(10):
        name = f"samples/{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "overlap" / name)), images[i]), name
        assert (tmp_path / "overlap" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()


def test_an_interrupted_overlapped_run_still_writes_the_batch_in_flight(tmp_path, export, monkeypatch):
    # Killed while sampling the third batch: the second batch, sampled and measured but not yet
    # collected (the overlap collects one batch late), is written all the same.
    from mutor_vision.evaluation import run as evaluation_run
    from mutor_vision.evaluation.run import sample_and_measure

    kill_generate_at_call(monkeypatch, evaluation_run, 3)
    with pytest.raises(KeyboardInterrupt):
        sample_and_measure(*pipeline_args(export, tmp_path / "run", overlap=True), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [f"{i:06d}.png" for i in range(8)]


def test_png_writer_holds_at_most_max_pending_images_and_counts_its_waits(tmp_path, monkeypatch):
    from mutor_vision.evaluation import samples as samples_module
    from mutor_vision.evaluation.samples import PngWriter

    original = samples_module.write_png

    def slow(path, image):
        time.sleep(0.02)
        original(path, image)

    monkeypatch.setattr(samples_module, "write_png", slow)
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    with PngWriter(tmp_path, threads=1, max_pending=5) as writer:
        for start in range(0, 12, 4):
            writer.submit(range(start, start + 4), images[start : start + 4])
            assert len(writer.pending) <= 5
    assert writer.waited_s > 0.02 and writer.drain_s > 0  # the third batch waited for the first
    for i in range(12):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{i:06d}.png")), images[i])


def test_timings_add_up_each_part_of_each_batch(tmp_path, export):
    from mutor_vision.evaluation.run import sample_and_measure
    from mutor_vision.evaluation.timing import Timings, _intersect, _length, _union

    timings = Timings("cpu")
    sample_and_measure(*pipeline_args(export, tmp_path / "run", overlap=True), False, timings)
    summary = timings.summary()
    assert {name: part["batches"] for name, part in summary["parts"].items()} == {
        "sample": 3, "decode": 3, "features": 3, "copy": 3,
    }  # fmt: skip
    assert set(summary["waits_s"]) == {"results", "png_queue", "png_drain"}
    parts = sum(part["wall_s"] for part in summary["parts"].values())
    assert 0 < parts <= summary["wall_s"] and "gpu_timeline" not in summary  # CPU: host time only
    # the GPU timeline's interval arithmetic
    merged = _union([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)])
    assert merged == [(0.0, 2.0), (3.0, 4.0)] and _length(merged) == 3.0
    assert _intersect(merged, [(1.5, 3.5)]) == [(1.5, 2.0), (3.0, 3.5)]


def test_ctrl_c_is_one_line_and_exit_130_and_help_lists_the_exit_codes(monkeypatch, capsys):
    from tokenizer import encode_imagenet

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(fid_cli, "run", interrupted)
    assert fid_cli.main(["--ckpt", "x"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("eval/fid.py:") == 1 and "same command resumes" in err
    for parse in (fid_cli.make_parser().parse_args, encode_imagenet.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        out = capsys.readouterr().out
        assert "exit codes: 0 done" in out and "5 a storage fault" in out and "130 Ctrl-C" in out


def test_inception_score_is_adms_chunks_of_5000_which_torch_fidelitys_ten_splits_equal_at_50000():
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits = np.random.default_rng(4).normal(size=(50_000, 20)) * 2
    ten = isc_features_to_metric(torch.as_tensor(logits), splits=10, shuffle=False)[KEY_METRIC_ISC_MEAN]
    assert inception_score(logits)[0] == pytest.approx(ten, rel=1e-9)

    def adm(part):  # ADM's compute_inception_score, one chunk
        probs = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        return np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(probs.mean(0, keepdims=True))), 1)))

    few = logits[:12_000]  # chunks of 5,000, 5,000 and 2,000
    expected = np.mean([adm(few[:5000]), adm(few[5000:10000]), adm(few[10000:])])
    assert inception_score(few)[0] == pytest.approx(expected, rel=1e-12)


def test_without_a_reference_the_run_stops_at_once_unless_it_asks_for_is_alone(tmp_path, export, inception_weights,
                                                                              capsys):  # fmt: skip
    argv = cli_args(export, tmp_path / "run", inception_weights)
    del argv[argv.index("--ref-folder") : argv.index("--ref-folder") + 2]
    start = time.perf_counter()
    assert fid_cli.main(argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ref-batch" in err and "--no-reference" in err, err
    assert not (tmp_path / "run").exists()
    results = fid_cli.run([*argv, "--no-reference", "--num-samples", "4"])
    assert set(results["metrics"]) == {"inception_score", "inception_score_std"} and "reference" not in results
    assert results["sampling"]["labels"] == "per-class"  # cli_args asks for it; the default is random
