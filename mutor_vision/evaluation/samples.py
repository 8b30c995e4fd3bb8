"""Sample files of an evaluation: one PNG per sample index, the ADM npz, the preview grid.

``samples/NNNNNN.png`` is sample NNNNNN (its class is ``label_list(...)[NNNNNN]``). PNGs are written
to a temp name and renamed, so a kill never leaves a half-written image that a rerun would count;
a rerun decodes the PNGs already there once before trusting them.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mutor_vision.files import atomic_write, space_warning, storage_faults

log = logging.getLogger(__name__)
_IO_THREADS = 8  # PNG encode/decode releases the GIL in zlib: threads overlap it with GPU work
_MAX_PENDING = 1024  # PNGs queued at most (200 MB at 256x256): past that the sampler waits for the writer


def label_list(num_samples: int, num_classes: int, per_class: bool = True, seed: int = 0) -> np.ndarray:
    """Sample i's class: ``i % num_classes`` (balanced: 50 per class for 50,000 / 1,000) or uniform."""
    if per_class:
        return np.arange(num_samples) % num_classes
    return np.random.default_rng(seed).integers(0, num_classes, num_samples)


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def missing_indices(folder: Path, indices: Sequence[int], verify: bool = False) -> list[int]:
    """Indices whose PNG is absent; with ``verify``, also those whose PNG does not decode (deleted)."""
    missing = [int(i) for i in indices if not png_path(folder, int(i)).is_file()]
    if not verify:
        return missing
    present = sorted(set(int(i) for i in indices) - set(missing))
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        decodes = list(pool.map(lambda i: _decodes(png_path(folder, i)), present))
    broken = [i for i, ok in zip(present, decodes, strict=True) if not ok]
    for index in broken:
        log.warning("%s does not decode: deleted, it will be sampled again", png_path(folder, index))
        png_path(folder, index).unlink(missing_ok=True)
    return sorted(missing + broken)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # any decoder error: truncated, garbage, wrong format
        return False


def write_png(path: Path, image: np.ndarray) -> None:
    # Not flushed to disk one by one (50,000 fsyncs): a PNG lost to a power cut fails to decode,
    # and the next run samples it again.
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), durable=False)


class PngWriter:
    """Writes PNGs on background threads while the caller goes on sampling; leaving the block waits for all.

    At most ``max_pending`` images wait in the queue: past that, :meth:`submit` waits for the oldest
    (``waited_s`` adds it up), so threads that cannot keep up slow the caller down instead of
    filling the host's memory (50,000 queued 256×256 images would hold 9.8 GB). A failed write is
    raised by the next ``submit`` or on leaving the block: none is lost silently. ``drain_s`` is the
    time leaving the block waited for the last writes.
    """

    def __init__(self, folder: Path, threads: int = _IO_THREADS, max_pending: int = _MAX_PENDING) -> None:
        self.folder = folder
        self.pool = ThreadPoolExecutor(threads)
        self.pending: list[Future] = []
        self.max_pending = max_pending
        self.waited_s = 0.0
        self.drain_s = 0.0

    def submit(self, indices: Sequence[int], images: np.ndarray) -> None:
        """Queue uint8 images (B, H, W, 3) for the sample indices."""
        self._raise_failures(wait=False)
        excess = len(self.pending) + len(indices) - self.max_pending
        if excess > 0:  # the pool writes in submission order: the oldest finish first
            began = time.perf_counter()
            wait_for(self.pending[:excess])
            self.waited_s += time.perf_counter() - began
            self._raise_failures(wait=False)
        for index, image in zip(indices, images, strict=True):
            self.pending.append(self.pool.submit(write_png, png_path(self.folder, int(index)), image))

    def _raise_failures(self, wait: bool) -> None:
        done = [f for f in self.pending if wait or f.done()]
        with storage_faults(self.folder, "cannot write sample PNGs"):  # a full disk: exit 5, not a traceback
            for future in done:
                future.result()  # re-raises the write's exception
        finished = set(done)
        self.pending = [f for f in self.pending if f not in finished]

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc) -> None:
        began = time.perf_counter()
        try:
            if exc[0] is None:
                self._raise_failures(wait=True)
        finally:  # on an error in the caller too: queued writes finish (whole files only)
            self.pool.shutdown(wait=True)
            self.drain_s = time.perf_counter() - began


def read_pngs(folder: Path, indices: Sequence[int]) -> np.ndarray:
    """The PNGs of ``indices`` as uint8 (N, H, W, 3), decoded on threads; an error names any gap."""
    missing = missing_indices(folder, indices)
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} sample(s) missing, e.g. {missing[:5]}")
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        images = list(pool.map(lambda i: np.asarray(Image.open(png_path(folder, int(i))).convert("RGB")), indices))
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def write_npz(folder: Path, num_samples: int, path: Path, chunk: int = 1024) -> None:
    """ADM sample batch: ``arr_0`` uint8 (N, H, W, 3), streamed into the archive a chunk at a time.

    No N-image RAM peak and no second copy on disk (a temp .npy would double the space it needs);
    a failed write (a full disk) leaves no partial file and raises :class:`StorageError`.
    """
    first = read_pngs(folder, [0])[0]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    header["shape"] = (num_samples, *first.shape)

    def archive(tmp: Path) -> None:
        with (
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipped,
            zipped.open("arr_0.npy", "w", force_zip64=True) as member,
        ):
            np.lib.format.write_array_header_1_0(member, header)
            for start in range(0, num_samples, chunk):
                member.write(np.ascontiguousarray(read_pngs(folder, range(start, min(num_samples, start + chunk)))))

    with storage_faults(path.parent, f"cannot write {path.name}"):
        atomic_write(path, archive)


def samples_bytes(num_samples: int, resolution: int, missing: int, npz: bool) -> int:
    """At most how many bytes the missing PNGs and ``samples.npz`` take (a PNG at most its raw pixels)."""
    image = resolution * resolution * 3
    return missing * image + (num_samples * image if npz else 0)


def check_space(out_dir: Path, num_samples: int, resolution: int, npz: bool) -> str | None:
    """Warn (and return the line) when ``out_dir`` cannot hold the samples still to write and the npz."""
    folder = out_dir / "samples"
    missing = max(num_samples - (sum(1 for _ in folder.glob("*.png")) if folder.is_dir() else 0), 0)
    need = samples_bytes(num_samples, resolution, missing, npz)
    what = f"{missing:,} PNGs" + (" and samples.npz" if npz else "")
    warning = space_warning(out_dir, need, what, num_samples * resolution * resolution * 3 if npz else 0)
    if warning:
        log.warning("%s", warning)
    return warning


def save_labelled_grid(images: np.ndarray, labels: Sequence[str], columns: int, path: Path, min_side: int = 64) -> None:
    """A PNG grid of uint8 images (N, H, W, 3), ``columns`` a row and each row's label at its left.
    Images smaller than ``min_side`` are enlarged by a whole factor (nearest), so a grid of small
    images stays legible."""
    from PIL import ImageDraw, ImageFont  # lazy: only the labelled grid draws text

    count, height, width, _ = images.shape
    rows = -(-count // columns)
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows of {columns}")
    scale = max(1, -(-min_side // max(height, width)))
    cell_h, cell_w, pad = height * scale, width * scale, 2
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(label, font=font) for label in labels)) + 4 * pad
    canvas = Image.new("RGB", (label_w + columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + column * (cell_w + pad), pad + row * (cell_h + pad)))
    for row, label in enumerate(labels):
        draw.text((2 * pad, pad + row * (cell_h + pad) + cell_h // 2), label, fill="black", font=font, anchor="lm")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """A PNG grid of uint8 images (N, H, W, 3)."""
    from torchvision.utils import make_grid  # lazy: a slow import, needed only for the grid

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    grid = make_grid(tensor, nrow=columns, padding=2, pad_value=255)
    atomic_write(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
