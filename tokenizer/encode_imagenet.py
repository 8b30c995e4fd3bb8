"""Encode an ImageNet-style dataset into webdataset shards of token grids.

    # one process (CPU or one GPU)
    python tokenizer/encode_imagenet.py --input /data/imagenet/train --out /data/in1k_vq16 \\
        --tokenizer vq16 --tokenizer-path vq_ds16_c2i.pt
    # 8 GPUs: each rank encodes a disjoint set of output shards
    accelerate launch --num_processes 8 tokenizer/encode_imagenet.py --input ... --out ...

Input: an ImageFolder (class = sorted WordNet-id folder order) or a folder of webdataset tars of
images (``jpg``/``jpeg``/``png`` + ``cls``). Output: ``train-NNNNNN.tar`` shards of
``tokens.npy`` (uint16, (n_crops, h, w)) + ``cls``, a ``train-NNNNNN.json`` sidecar per finished
shard, and ``manifest.json``. ImageFolder images are spread over the shards in a seeded random
order (``--order shuffled``, the default; ``--order sorted`` keeps folder order, one or two classes
per shard, which the training stream's shuffle buffer cannot mix). Crops: ``adm-flip`` (ADM centre
crop + its mirror; the paper's setting, default), ``ten-crop`` (LlamaGen) or ``center`` (one crop, no mirror; the demo).
Re-running resumes: finished shards (sidecar present) are kept, a partial one is rewritten; the
output is byte-identical either way. ``encode_settings.json`` records what decides the output
(input listing, crop, size, tokenizer checksum, ``--maxcount``): a rerun with other settings into a
folder that holds finished shards is refused instead of mixing two datasets. An unreadable image
is logged, counted in the manifest and skipped; a run in which no image could be read fails
(exit 4) and writes no manifest. The progress bar counts images (on the CPU each image goes
through the tokenizer alone, see ``encoder_calls``); Ctrl-C stops with one line and exit 130.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import re
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mutor_vision.cli import ENCODE_EXIT_CODES, FORCE_HELP, HelpFormatter, run_command, setup_logging
from mutor_vision.errors import InputError
from mutor_vision.files import atomic_write_json, check_stamp
from mutor_vision.peers import peers
from mutor_vision.processes import DEFAULT_COLLECTIVE_TIMEOUT_S, main_process_holds, process_state
from mutor_vision.shards import write_manifest, write_shard
from tokenizer import load_tokenizer
from tokenizer.preprocess import CropMode, crops, num_crops, to_model_input

log = logging.getLogger("encode_imagenet")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SETTINGS = "encode_settings.json"  # the settings stamp of an output folder
FORMAT_VERSION = 2  # 2: sample keys are unique by construction (index + name)
# Stamps written before the order was recorded: those folders were encoded in folder order.
STAMP_DEFAULTS = {"order": "sorted", "shuffle_seed": None}


@dataclass(frozen=True)
class Item:
    """One input image: a file path, or a member of an input tar."""

    key: str
    label: int
    path: str
    member: str | None = None  # name inside the tar at ``path``


@dataclass(frozen=True)
class Source:
    shards: list[list[Item]]  # the items of each output shard, in order
    classes: list[str] | None
    kind: str
    order: str  # "shuffled" (seeded), "sorted" (folder order) or "as-input" (tars: their own order)


def sample_key(index: int, stem: str) -> str:
    """A unique webdataset key: the item's index (unique by construction) + its name for humans.

    File names alone collide (``x.jpg``/``x.png``, or ``a.b`` and ``a_b`` once dots are replaced)
    and a duplicate key makes an invalid tar.
    """
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:64]}"


def image_folder(root: Path, maxcount: int, order: str = "shuffled", seed: int = 0) -> Source:
    """The images of an ImageFolder cut into shards of ``maxcount``, in a seeded random order by default.

    In folder order a shard would hold one or two classes (ImageNet: ~1,300 images per class, 1,000
    per shard), and the training stream, which reads whole shards through a shuffle buffer of a few
    thousand samples, would give batches of a handful of classes that change as the stream moves on.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"--input {root}: no class folders (expected an ImageFolder: root/<wnid>/<image>)")
    files = [
        (label, f)
        for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise InputError(f"--input {root}: no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    if order == "shuffled":
        random.Random(seed).shuffle(files)  # the same permutation on every Python 3 (seeded Random)
    items = [Item(key=sample_key(i, f.stem), label=label, path=str(f)) for i, (label, f) in enumerate(files)]
    shards = [items[i : i + maxcount] for i in range(0, len(items), maxcount)]
    return Source(shards, classes, "imagefolder", order)


def tar_folder(root: Path) -> Source:
    """One output shard per input tar; labels from each sample's ``cls`` (webdataset naming: key.ext)."""
    from webdataset.tariterators import base_plus_ext

    shards, index = [], 0
    for tar_path in sorted(root.glob("*.tar")):
        images: dict[str, str] = {}
        labels: dict[str, int] = {}
        with tarfile.open(tar_path) as archive:
            for member in archive:
                stem, ext = base_plus_ext(member.name)
                if stem is None or not member.isfile():
                    continue
                if ext.lower() in ("jpg", "jpeg", "png", "webp"):
                    images.setdefault(stem, member.name)
                elif ext.lower() == "cls":
                    text = archive.extractfile(member).read().decode().strip()
                    try:
                        labels[stem] = int(text)
                    except ValueError:
                        raise InputError(f"{tar_path}::{member.name}: class {text!r} is not an integer") from None
        items = []
        for stem, name in images.items():
            if stem in labels:
                items.append(
                    Item(key=sample_key(index, Path(stem).name), label=labels[stem], path=str(tar_path), member=name)
                )
                index += 1
        shards.append(items)
    if not shards:
        raise InputError(f"--input {root}: no .tar files")
    classes_file = root / "classes.txt"
    classes = classes_file.read_text().split() if classes_file.is_file() else None
    return Source(shards, classes, "webdataset", "as-input")


def open_source(root: Path, maxcount: int, order: str = "shuffled", seed: int = 0) -> Source:
    if not root.is_dir():
        raise InputError(f"--input {root}: not a directory")
    return tar_folder(root) if any(root.glob("*.tar")) else image_folder(root, maxcount, order, seed)


def load_crops(item: Item, size: int, mode: CropMode, blob: bytes | None = None) -> list[Image.Image] | str:
    """The crops of one image (from its file, or ``blob`` for tar members), or the error text."""
    try:
        with Image.open(item.path if blob is None else io.BytesIO(blob)) as image:
            return crops(image, size, mode)
    except Exception as error:  # any decoder failure is a skipped image, never a crash
        return f"{type(error).__name__}: {error}"


def read_members(items: list[Item]) -> dict[str, bytes]:
    """All tar members of a shard's items in one pass over the tar (none for file items)."""
    wanted = {it.member for it in items if it.member is not None}
    if not wanted:
        return {}
    with tarfile.open(items[0].path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.name in wanted}


def encoder_calls(good: list, device: torch.device) -> list[list]:
    """How a decoded batch goes through the tokenizer: whole on a GPU, one image per call on the CPU.

    On the CPU batching buys little (VQ-16 took as long per image one at a time as in one batch;
    docs/imagenet.md) while a 64-image batch holds the progress bar still for minutes: one image
    per call moves it per image. Same device, same calls: a resumed run's output stays identical.
    """
    size = len(good) if device.type == "cuda" else 1
    return [good[i : i + size] for i in range(0, len(good), size)] if good else []


def shard_name(index: int) -> str:
    return f"train-{index:06d}"


def encode_shard(
    items: list[Item],
    out_dir: Path,
    index: int,
    tokenizer,
    args: argparse.Namespace,
    device: torch.device,
    pool: ThreadPoolExecutor,
    progress,
) -> dict:
    """Write one shard atomically, then its sidecar (which marks it finished); return the sidecar."""
    skipped: list[dict] = []
    per_image = num_crops(args.crop)
    blobs = read_members(items)

    def samples():
        for start in range(0, len(items), args.batch_size):
            chunk = items[start : start + args.batch_size]
            loaded = list(pool.map(lambda it: load_crops(it, args.image_size, args.crop, blobs.get(it.member)), chunk))
            good = [(it, c) for it, c in zip(chunk, loaded, strict=True) if not isinstance(c, str)]
            for it, c in zip(chunk, loaded, strict=True):
                if isinstance(c, str):
                    log.warning("skipping unreadable image %s%s: %s", it.path, f"::{it.member}" if it.member else "", c)
                    skipped.append({"path": it.path, "member": it.member, "error": c})
            progress.update(len(chunk) - len(good))
            for part in encoder_calls(good, device):
                images = to_model_input([im for _, cs in part for im in cs]).to(device)
                with torch.no_grad():
                    codes = tokenizer.encode(images).cpu().numpy()
                codes = codes.reshape(len(part), per_image, *codes.shape[1:])
                for (item, _), grid in zip(part, codes, strict=True):
                    yield item.key, grid, item.label
                progress.update(len(part))

    count = write_shard(out_dir / f"{shard_name(index)}.tar", samples())
    sidecar = {"shard": f"{shard_name(index)}.tar", "count": count, "skipped": skipped}
    atomic_write_json(out_dir / f"{shard_name(index)}.json", sidecar)
    return sidecar


def settings_of(source: Source, tokenizer, args: argparse.Namespace) -> dict:
    """What decides the bytes of the output: a rerun into the same --out must match it."""
    listing = hashlib.sha256()
    for shard in source.shards:
        for item in shard:
            listing.update(f"{item.key}\t{item.label}\t{item.path}\t{item.member}\n".encode())
        listing.update(b"--\n")
    return {
        "format": FORMAT_VERSION,
        "input": str(args.input.resolve()),
        "input_kind": source.kind,
        "input_listing": listing.hexdigest()[:16],
        "num_shards": len(source.shards),
        "order": source.order,
        "shuffle_seed": args.shuffle_seed if source.order == "shuffled" else None,
        "maxcount": args.maxcount,
        "image_size": args.image_size,
        "crop": args.crop,
        "tokenizer": {"kind": args.tokenizer, "checksum": tokenizer.checksum},
    }


def write_dataset_manifest(
    out_dir: Path, source: Source, tokenizer, grid: tuple[int, int], args: argparse.Namespace
) -> dict:
    sidecars = [json.loads((out_dir / f"{shard_name(i)}.json").read_text()) for i in range(len(source.shards))]
    skipped = [x for s in sidecars for x in s["skipped"]]
    num_samples = sum(s["count"] for s in sidecars)
    if num_samples == 0:
        example = f", e.g. {skipped[0]['path']}: {skipped[0]['error']}" if skipped else ""
        raise InputError(f"--input {args.input}: no image could be read ({len(skipped)} failed{example})")
    manifest = {
        "num_samples": num_samples,
        "num_shards": len(sidecars),
        "shards": [s["shard"] for s in sidecars],
        "shard_counts": [s["count"] for s in sidecars],
        "grid": list(grid),
        "num_crops": num_crops(args.crop),
        "crop": args.crop,
        "image_size": args.image_size,
        "codebook_size": int(tokenizer.vocab_size),
        "tokenizer": {
            "kind": args.tokenizer,
            "path": str(args.tokenizer_path.resolve()),
            "checksum": tokenizer.checksum,
        },
        "classes": source.classes,
        "num_classes": len(source.classes) if source.classes else None,
        "input": {"path": str(args.input), "kind": source.kind},
        "order": source.order,
        "shuffle_seed": args.shuffle_seed if source.order == "shuffled" else None,
        "skipped": skipped,
        "num_skipped": len(skipped),
    }
    write_manifest(out_dir, manifest)
    return manifest


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenizer/encode_imagenet.py",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog=ENCODE_EXIT_CODES,
    )
    parser.add_argument("--input", type=Path, required=True, help="ImageFolder root, or a folder of .tar shards")
    parser.add_argument("--out", type=Path, required=True, help="the output folder, held by one run at a time")
    parser.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="--out"))
    parser.add_argument("--tokenizer", choices=["vq16", "palette"], default="vq16", help="the tokenizer's kind")
    parser.add_argument("--tokenizer-path", type=Path, required=True, help="vq_ds16_c2i.pt or a palette JSON")
    parser.add_argument("--image-size", type=int, default=256, help="the side images are cropped to, in pixels")
    parser.add_argument(
        "--crop",
        choices=["adm-flip", "ten-crop", "center"],
        default="adm-flip",
        help="adm-flip: ADM's centre crop and its mirror (the paper's setting); ten-crop: LlamaGen's ten crops; "
        "center: one crop, no mirror",
    )
    parser.add_argument("--maxcount", type=int, default=1000, help="images per output shard (ImageFolder input)")
    parser.add_argument(
        "--order",
        choices=["shuffled", "sorted"],
        default="shuffled",
        help="ImageFolder input: images across shards in a seeded random order (training streams shards "
        "through a shuffle buffer, so class-sorted shards give batches of few classes) or in folder order",
    )
    parser.add_argument("--shuffle-seed", type=int, default=0, help="the seed of --order shuffled")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding images")
    parser.add_argument(
        "--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when available; cpu pins the CPU"
    )
    parser.add_argument(
        "--collective-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S, help="seconds a collective waits "
        "for a rank that does not come (several processes; long waits notice a lost machine sooner)"
    )  # fmt: skip
    parser.add_argument("--limit-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop early
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(argv: list[str] | None = None) -> dict | None:
    """Encode per the command line; return the manifest on the main process (None elsewhere)."""
    args = parse_args(argv)
    state = process_state(args.device, timedelta(seconds=args.collective_timeout))  # gloo between CPU ranks
    source = open_source(args.input, args.maxcount, args.order, args.shuffle_seed)
    tokenizer = load_tokenizer(args.tokenizer, str(args.tokenizer_path))
    # One run per --out (mutor_vision/locks.py): two would rewrite each other's partial shards.
    with main_process_holds(state, args.out, "--out", force=args.force):
        return encode_held(args, state, source, tokenizer)


def encode_held(args: argparse.Namespace, state, source: Source, tokenizer) -> dict | None:
    """Encode into ``args.out`` (held by this run); the manifest on the main process."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    finished = {i for i in range(len(source.shards)) if (args.out / f"{shard_name(i)}.json").is_file()}
    # Every rank compares; the main process records. Kept shards made with other settings refuse.
    stamp_args = (args.out / SETTINGS, settings_of(source, tokenizer, args), bool(finished))
    remedy = "use another --out, or delete it to start over"
    check_stamp(*stamp_args, remedy=remedy, write=False, defaults=STAMP_DEFAULTS)
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        check_stamp(*stamp_args, remedy=remedy, write=True, defaults=STAMP_DEFAULTS)
    peers().wait("stamp")
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer = tokenizer.to(state.device)
    side = args.image_size // tokenizer.downsample
    mine = [i for i in range(len(source.shards)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if i not in finished]
    if args.limit_shards is not None:
        todo = todo[: args.limit_shards]
    total = sum(len(source.shards[i]) for i in todo)
    log.info("rank %d: %d of %d shards to encode (%d images)", state.process_index, len(todo), len(mine), total)
    with (
        ThreadPoolExecutor(args.workers) as pool,
        tqdm(total=total, unit="img", disable=not state.is_local_main_process) as progress,
        logging_redirect_tqdm(tqdm_class=tqdm),  # warnings (a skipped image) print above the bar, not into it
    ):
        for i in todo:
            peers().check()  # a lost machine stops this one between shards, not at the end
            encode_shard(source.shards[i], args.out, i, tokenizer, args, state.device, pool, progress)
    peers().wait("encoded")  # ranks end at different times: wait while they live, however long
    if args.limit_shards is not None:
        return None
    if state.is_main_process:
        manifest = write_dataset_manifest(args.out, source, tokenizer, (side, side), args)
        log.info(
            "wrote %d samples in %d shards (%d skipped)",
            manifest["num_samples"],
            manifest["num_shards"],
            manifest["num_skipped"],
        )
        return manifest
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py`` (4: unreadable input, no images; 5: a full
    disk; 130: Ctrl-C)."""
    setup_logging()
    hint = "finished shards are kept: make room, then run the same command to go on"
    # Shards are written atomically with their sidecar last: what finished is kept, the rest resumes.
    interrupted = "finished shards are kept, the same command resumes"
    return run_command("encode_imagenet", lambda: run(argv), storage_hint=hint, interrupt_hint=interrupted)


if __name__ == "__main__":
    sys.exit(main())
