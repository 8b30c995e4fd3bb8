"""Images -> token shards -> streaming batches, with resume, corrupt input and two ranks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, run_two_cpu_ranks
from PIL import Image

from mutor_vision.data import token_loader
from mutor_vision.errors import ConfigError
from mutor_vision.shards import ShardError, read_manifest
from tokenizer import PaletteTokenizer, to_model_input
from tokenizer.encode_imagenet import run as encode_main

ROOT = Path(__file__).resolve().parent.parent


def encode(image_folder: Path, out: Path, palette: Path, *extra: str) -> dict:
    argv = ["--input", str(image_folder), "--out", str(out), "--tokenizer", "palette"]
    argv += ["--tokenizer-path", str(palette), "--image-size", "8", "--maxcount", "4", "--batch-size", "3", *extra]
    return encode_main(argv)


def test_image_folder_to_shards_to_batches(tmp_path, image_folder, palette_file):
    (image_folder / "n00000001" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    manifest = encode(image_folder, tmp_path / "shards", palette_file)
    assert manifest["num_samples"] == 15 and manifest["num_shards"] == 4  # 16 files, 4 per shard
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["path"].endswith("broken.jpg")
    assert manifest["grid"] == [8, 8] and manifest["codebook_size"] == 6 and manifest["num_crops"] == 2
    assert manifest["classes"] == ["n00000000", "n00000001", "n00000002"]

    # Stored grids are the palette codes of the image and of its mirror.
    import webdataset as wds

    tokenizer = PaletteTokenizer(COLORS)
    sample = next(iter(wds.WebDataset(str(tmp_path / "shards" / "train-000000.tar"), shardshuffle=False)))
    tokens = np.load(__import__("io").BytesIO(sample["tokens.npy"]))
    assert tokens.dtype == np.uint16 and tokens.shape == (2, 8, 8)
    stem = sample["__key__"].split("_", 1)[1]  # key = index + file stem
    label = int(sample["cls"])
    image = np.asarray(Image.open(image_folder / f"n{label:08d}" / f"{stem}.png").convert("RGB"))
    expected = tokenizer.encode(to_model_input(image[None])).numpy()[0]
    assert np.array_equal(tokens[0], expected) and np.array_equal(tokens[1], expected[:, ::-1])
    assert stem.startswith(f"n{label:08d}_")

    loader = token_loader(tmp_path / "shards", batch_size=5, num_batches=7, seed=0, num_workers=2, shuffle_buffer=8)
    batches = list(loader)
    assert len(batches) == 7
    for tokens, labels in batches:
        assert tokens.shape == (5, 64) and tokens.dtype == torch.long and int(tokens.max()) < 6
        assert labels.shape == (5,) and set(labels.tolist()) <= {0, 1, 2}
    again = list(
        token_loader(tmp_path / "shards", batch_size=5, num_batches=7, seed=0, num_workers=2, shuffle_buffer=8)
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # seeded: reproducible
    other = list(
        token_loader(tmp_path / "shards", batch_size=5, num_batches=7, seed=1, num_workers=2, shuffle_buffer=8)
    )
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))


def shard_labels(out: Path) -> list[list[int]]:
    import webdataset as wds

    manifest = read_manifest(out)
    return [[int(x["cls"]) for x in wds.WebDataset(url, shardshuffle=False)] for url in manifest.urls]


def test_image_folder_is_spread_over_shards_in_a_seeded_order(tmp_path, palette_file):
    """In folder order a shard holds one class and the stream's batches a few; the default order is a
    seeded permutation: every image once, classes mixed in every shard, the same for the same seed."""
    from conftest import make_image_folder

    from mutor_vision.training.c2i import order_warnings

    images = make_image_folder(tmp_path / "images", classes=4, per_class=6)
    shuffled = encode(images, tmp_path / "shuffled", palette_file)
    assert shuffled["order"] == "shuffled" and shuffled["shuffle_seed"] == 0
    labels = shard_labels(tmp_path / "shuffled")
    assert sorted(x for shard in labels for x in shard) == sorted(
        [c for c in range(4) for _ in range(6)]
    )  # every image once
    assert all(len(set(shard)) > 1 for shard in labels), labels
    encode(images, tmp_path / "again", palette_file)
    assert shard_labels(tmp_path / "again") == labels
    encode(images, tmp_path / "seed1", palette_file, "--shuffle-seed", "1")
    assert shard_labels(tmp_path / "seed1") != labels
    assert order_warnings(read_manifest(tmp_path / "shuffled")) == []

    in_folder_order = encode(images, tmp_path / "sorted", palette_file, "--order", "sorted")
    assert in_folder_order["order"] == "sorted" and in_folder_order["shuffle_seed"] is None
    assert [x for shard in shard_labels(tmp_path / "sorted") for x in shard] == [c for c in range(4) for _ in range(6)]
    (warning,) = order_warnings(read_manifest(tmp_path / "sorted"))
    assert "class order" in warning and "--order shuffled" in warning
    manifest_path = tmp_path / "shuffled" / "manifest.json"  # as written before the order was recorded
    raw = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({k: v for k, v in raw.items() if k not in ("order", "shuffle_seed")}))
    (warning,) = order_warnings(read_manifest(tmp_path / "shuffled"))
    assert "may be in class order" in warning
    # Another order into a folder holding finished shards is refused, never mixed.
    with pytest.raises(ConfigError, match="order"):
        encode(images, tmp_path / "sorted", palette_file)
    # A folder encoded before the order was recorded (folder order) resumes with --order sorted.
    stamp = tmp_path / "sorted" / "encode_settings.json"
    recorded = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("order", "shuffle_seed")}))
    assert encode(images, tmp_path / "sorted", palette_file, "--order", "sorted")["num_samples"] == 24


def test_interrupted_encode_resumes_to_identical_shards(tmp_path, image_folder, palette_file):
    full = encode(image_folder, tmp_path / "full", palette_file)
    out = tmp_path / "resumed"
    assert encode(image_folder, out, palette_file, "--limit-shards", "2") is None  # "killed" after 2 shards
    (out / ".train-000002.tar.tmp").write_bytes(b"half a shard")  # a partial shard left behind
    (out / "train-000003.tar").write_bytes(b"renamed but no sidecar")  # finished tar, sidecar missing
    before = (out / "train-000000.tar").stat().st_mtime_ns
    resumed = encode(image_folder, out, palette_file)
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # finished shards kept
    assert resumed == {**full, "input": resumed["input"]} or _same_manifest(full, resumed)
    for name in full["shards"]:
        assert (tmp_path / "full" / name).read_bytes() == (out / name).read_bytes(), name
    assert not list(out.glob(".*.tmp"))


def _same_manifest(a: dict, b: dict) -> bool:
    keys = set(a) - {"input"}
    return all(a[k] == b[k] for k in keys)


def test_manifest_mismatch_and_missing_are_clear(tmp_path, image_folder, palette_file):
    encode(image_folder, tmp_path / "shards", palette_file)
    with pytest.raises(ShardError, match="grid"):
        token_loader(tmp_path / "shards", 2, 1, 0, expect=dict(grid_size=16, vocab_size=6, num_classes=3))
    with pytest.raises(ShardError, match="codebook size 6"):
        token_loader(tmp_path / "shards", 2, 1, 0, expect=dict(grid_size=8, vocab_size=16384, num_classes=3))
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "shards" / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="missing"):
        read_manifest(tmp_path / "shards")


def test_corrupt_shard_is_an_error_or_a_counted_skip(tmp_path, image_folder, palette_file):
    encode(image_folder, tmp_path / "shards", palette_file)
    shard = tmp_path / "shards" / "train-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])  # truncated mid-member
    with pytest.raises(ShardError, match=r"train-000002\.tar"):
        for _ in token_loader(tmp_path / "shards", 4, 50, seed=0, num_workers=0, shuffle_buffer=1):
            pass
    batches = list(token_loader(tmp_path / "shards", 4, 30, seed=0, num_workers=0, shuffle_buffer=1, on_error="skip"))
    assert len(batches) == 30
    for name in ("train-000000.tar", "train-000001.tar", "train-000003.tar"):
        (tmp_path / "shards" / name).write_bytes(b"garbage" * 100)
    shard.write_bytes(b"garbage" * 100)
    with pytest.raises(ShardError, match="all 4 shards of this rank are unreadable"):  # an error, never a hang
        list(token_loader(tmp_path / "shards", 4, 5, seed=0, num_workers=0, on_error="skip"))


RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from accelerate import PartialState
from mutor_vision.data import token_loader
from mutor_vision.errors import ConfigError
state = PartialState(cpu=True)
loader = token_loader(sys.argv[1], batch_size=3, num_batches=6, seed=0, rank=state.process_index,
                      world_size=state.num_processes, num_workers=2, shuffle_buffer=4)
count, labels = 0, []
for tokens, y in loader:
    count += 1
    labels += y.tolist()
counts = torch.tensor([count])
gathered = [torch.zeros(1, dtype=torch.long) for _ in range(state.num_processes)]
dist.all_gather(gathered, counts)
state.wait_for_everyone()
# One file per rank: two processes printing to one pipe can interleave their lines.
with open(f"{sys.argv[2]}/rank{state.process_index}.json", "w") as f:
    json.dump({"rank": state.process_index, "world": state.num_processes,
               "counts": [int(c) for c in gathered], "labels": labels}, f)
"""


def test_two_rank_cpu_loader_equal_batches_no_hang(tmp_path, image_folder, palette_file):
    encode(image_folder, tmp_path / "shards", palette_file)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    result = run_two_cpu_ranks([str(script), str(tmp_path / "shards"), str(tmp_path)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1], result.stdout and all(r["world"] == 2 for r in rows)
    assert all(r["counts"] == [6, 6] for r in rows)


def test_two_rank_encode_equals_one_rank(tmp_path, image_folder, palette_file):
    single = encode(image_folder, tmp_path / "single", palette_file)
    cmd = ["tokenizer/encode_imagenet.py", "--input", str(image_folder), "--out", str(tmp_path / "two")]
    cmd += ["--tokenizer", "palette", "--tokenizer-path", str(palette_file), "--image-size", "8", "--maxcount", "4"]
    result = run_two_cpu_ranks(cmd, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: 2 of 2 shards" in result.stderr  # disjoint slices: each rank did its half
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert _same_manifest(single, two)
    for name in single["shards"]:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_webdataset_tar_input(tmp_path, image_folder, palette_file):
    import webdataset as wds

    source = tmp_path / "wds"
    source.mkdir()
    files = sorted(image_folder.rglob("*.png"))
    for shard in range(2):
        with wds.TarWriter(str(source / f"in-{shard}.tar")) as writer:
            for i, path in enumerate(files[shard::2]):
                writer.write({"__key__": f"img{shard}_{i}", "png": path.read_bytes(), "cls": i % 3})
    manifest = encode(source, tmp_path / "shards", palette_file)
    assert manifest["num_shards"] == 2 and manifest["num_samples"] == len(files)
    assert manifest["input"]["kind"] == "webdataset"
    batches = list(token_loader(tmp_path / "shards", batch_size=4, num_batches=3, seed=0, num_workers=0))
    assert len(batches) == 3 and batches[0][0].shape == (4, 64)


def test_cpu_encoding_counts_progress_per_image(tmp_path, image_folder, palette_file, monkeypatch):
    # On the CPU each image goes through the tokenizer alone and moves the bar by one: a batch of
    # 64 VQ-16 images would otherwise hold it still for minutes.
    import tqdm

    calls, steps = [], []
    encode_images = PaletteTokenizer.encode
    update = tqdm.tqdm.update
    monkeypatch.setattr(PaletteTokenizer, "encode", lambda self, x: calls.append(len(x)) or encode_images(self, x))
    monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: steps.append(n) or update(self, n))
    (image_folder / "n00000001" / "broken.jpg").write_bytes(b"not an image")
    manifest = encode(image_folder, tmp_path / "shards", palette_file, "--device", "cpu")  # --batch-size 3
    assert manifest["num_samples"] == 15 and calls == [2] * 15  # two crops (adm-flip) of one image per call
    assert sum(steps) == 16 and set(steps) <= {0, 1}  # every image counted once, the broken one too


def test_encoder_ctrl_c_is_one_line_and_exit_130(tmp_path, image_folder, palette_file, monkeypatch, capsys):
    from tokenizer import encode_imagenet

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_imagenet, "encode_shard", interrupted)
    argv = ["--input", str(image_folder), "--out", str(tmp_path / "out"), "--tokenizer", "palette"]
    assert encode_imagenet.main([*argv, "--tokenizer-path", str(palette_file), "--image-size", "8"]) == 130
    err = capsys.readouterr().err  # the progress bar, then one line
    assert err.strip().splitlines()[-1] == (
        "encode_imagenet: interrupted (Ctrl-C); finished shards are kept, the same command resumes"
    )
    assert "Traceback" not in err and err.count("encode_imagenet:") == 1
