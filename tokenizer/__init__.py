"""Image tokenizers (LlamaGen VQ-16, palette) and the ImageNet -> token-shard encoder.

This package lives at the repository root and is deliberately *not* installed into
site-packages (see docs/architecture.md, "Why tokenizer/ is not installed"): run from the
checkout, where ``from tokenizer import ...`` resolves. The library (``mutor_vision``) never imports
it: tokenizers produce token shards, the library consumes them.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from tokenizer.palette import PaletteTokenizer
from tokenizer.preprocess import center_crop_adm, crops, to_model_input, to_uint8
from tokenizer.vq16 import VQ16, VQ16Config, decoder_in

__all__ = [
    "DECODE_PRECISIONS",
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
    "uint8_decoder",
]


KINDS = ("vq16", "palette")
DECODE_PRECISIONS = ("fp32", "bf16")


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


def uint8_decoder(tokenizer: VQ16 | PaletteTokenizer, precision: str = "fp32") -> Callable[[Tensor], Tensor]:
    """codes (B, h, w) -> uint8 images (B, 3, H, W) on the codes' device: what evaluation measures.

    ``fp32`` decodes as LlamaGen's evaluation does: in float32 (on CUDA cuDNN may run the
    convolutions in TF32, PyTorch's default and what LlamaGen's sampling script sets). ``bf16`` runs
    VQ-16's decoder in bfloat16 (weights and activations; the codebook lookup stays float32): about
    half the time and memory traffic on a GPU, but pixels differ, so its FID is not LlamaGen's
    protocol (docs/evaluation.md, "Decode precision"). A palette decodes exactly: fp32 only.
    """
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decode precision must be one of {DECODE_PRECISIONS}, got {precision!r}")
    if isinstance(tokenizer, PaletteTokenizer):
        if precision != "fp32":
            raise ValueError(f"decode precision {precision}: only VQ-16 has a decoder to run in it")
        colors: dict[torch.device, Tensor] = {}  # the palette on each device once (no copy per batch)

        def paint(codes: Tensor) -> Tensor:
            table = colors.setdefault(codes.device, tokenizer.colors.to(codes.device))
            return to_uint8(table[codes].permute(0, 3, 1, 2).contiguous())

        return paint
    decode = tokenizer.decode if precision == "fp32" else decoder_in(tokenizer, torch.bfloat16)
    return lambda codes: to_uint8(decode(codes).float())
