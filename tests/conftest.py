"""Shared fixtures: tiny synthetic datasets built in temp dirs (no downloads, no real weights)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mutor_vision.processes import cpu_child_env, cpu_ranks_command
from tokenizer import PaletteTokenizer

ROOT = Path(__file__).resolve().parent.parent


def two_cpu_ranks() -> list[str]:
    return cpu_ranks_command(2)


def child_env() -> dict[str, str]:
    return cpu_child_env(ROOT)


def run_two_cpu_ranks(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` on two CPU ranks (gloo), from the repository root."""
    return subprocess.run(
        [*two_cpu_ranks(), *args], capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=ROOT
    )


# Six colours; test images are painted from them so the palette tokenizer is exact.
COLORS = np.array([[0, 0, 0], [255, 255, 255], [200, 30, 30], [30, 200, 30], [30, 30, 200], [240, 200, 20]], np.uint8)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 5, size: int = 8, seed: int = 0) -> Path:
    """An ImageFolder of palette-coloured PNGs; class c prefers colour c (so classes differ)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            index = rng.choice(len(COLORS), size=(size, size), p=_class_probs(c))
            Image.fromarray(COLORS[index]).save(folder / f"n{c:08d}_{i}.png")
    return root


def _class_probs(c: int) -> np.ndarray:
    p = np.full(len(COLORS), 1.0)
    p[c % len(COLORS)] = 6.0
    return p / p.sum()


@pytest.fixture
def palette_file(tmp_path) -> Path:
    path = tmp_path / "palette.json"
    PaletteTokenizer(COLORS).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")
