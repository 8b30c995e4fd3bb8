"""Image tokenizers (LlamaGen VQ-16, palette) and the ImageNet -> token-shard encoder.

This package lives at the repository root and is deliberately *not* installed into
site-packages (see docs/architecture.md, "Why tokenizer/ is not installed"): run from the
checkout, where ``from tokenizer import ...`` resolves. The library (``mutor_vision``) never imports
it: tokenizers produce token shards, the library consumes them.
"""

from pathlib import Path

from tokenizer.palette import PaletteTokenizer
from tokenizer.preprocess import center_crop_adm, crops, to_model_input, to_uint8
from tokenizer.vq16 import VQ16, VQ16Config

__all__ = [
    "KINDS",
    "VQ16",
    "PaletteTokenizer",
    "VQ16Config",
    "center_crop_adm",
    "crops",
    "load_tokenizer",
    "to_model_input",
    "to_uint8",
    "tokenizer_kind",
]


KINDS = ("vq16", "palette")


def tokenizer_kind(path: str | Path) -> str:
    """``palette`` for a palette JSON file (it starts with ``{``), else ``vq16`` (a PyTorch checkpoint)."""
    with open(path, "rb") as handle:
        return "palette" if handle.read(64).lstrip().startswith(b"{") else "vq16"


def load_tokenizer(kind: str | None, path: str | Path):
    """A tokenizer by kind (``vq16`` | ``palette``; None: told by the file) from its file."""
    kind = kind or tokenizer_kind(path)
    if kind == "vq16":
        return VQ16.from_pretrained(path)
    if kind == "palette":
        return PaletteTokenizer.load(path)
    raise ValueError(f"tokenizer kind must be 'vq16' or 'palette', got {kind!r}")
