"""What the image commands share (``eval/fid.py``, ``sample_c2i.py``): the checkpoint, tokenizer and
sampling flags, and loading the model and its decoder from them, so that a flag means the same in
every command and is checked the same way."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mutor_vision.core.drafting import check_draft_tokens
from mutor_vision.errors import ConfigError, InputError
from mutor_vision.hub import is_hub_name
from mutor_vision.models import GPT, SamplingConfig
from mutor_vision.models.checkpoint import locate_checkpoint, read_export_tokenizer
from mutor_vision.models.sampling import trained_raster_offsets
from tokenizer import DECODE_PRECISIONS, KINDS, load_tokenizer, tokenizer_kind, uint8_decoder

log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--ckpt and what reads it: its architecture, trust, the tokenizer, precision and device."""
    p.add_argument(
        "--ckpt",
        required=True,
        help="an export directory, a .safetensors file, an official LlamaGen .pt (with --size), or a Hugging "
        "Face Hub id (owner/name) of an export",
    )
    p.add_argument("--size", default="GPT-B", help="the architecture of an official file (exports carry theirs)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling (LlamaGen's DDP files)")
    p.add_argument(
        "--tokenizer-path",
        "--vq-ckpt",
        dest="tokenizer_path",
        default=None,
        help="the tokenizer file: LlamaGen's vq_ds16_c2i.pt or a palette .json (default: the one recorded "
        "in the export); --vq-ckpt is the same flag",
    )
    p.add_argument("--tokenizer", choices=KINDS, default=None, help="its kind (default: told by the file)")
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default=None, help="the model's weights (default: bf16 on CUDA, "
        "fp32 on the CPU)"
    )  # fmt: skip
    p.add_argument(
        "--decode-precision",
        choices=DECODE_PRECISIONS,
        default="fp32",
        help="the VQ-16 decoder's precision: fp32 (LlamaGen's protocol) or bf16 (faster on a GPU, but pixels "
        "differ and FID is not comparable: docs/evaluation.md)",
    )
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when available")


def add_sampling_args(p: argparse.ArgumentParser, cfg_scale: float, top_k: int) -> None:
    """The settings of a draw (``SamplingConfig``) and how it runs (compile, drafting)."""
    p.add_argument("--cfg-scale", type=float, default=cfg_scale, help="classifier-free guidance on logits (1: none)")
    p.add_argument(
        "--cfg-interval",
        type=int,
        default=-1,
        help="LlamaGen's: guide the first N + 2 tokens only, then the class rows alone (-1: every token)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=top_k, help="keep the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set holding this mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="image i's random numbers derive from (seed, i)")
    p.add_argument("--compile", action="store_true", help="each decode step as a CUDA graph (CUDA only)")
    p.add_argument(
        "--draft-tokens", type=int, default=1, help="k > 1: the model's registers draft k - 1 tokens per forward"
    )


def sampling_config(args: argparse.Namespace, cfg_scale: float | None = None) -> SamplingConfig:
    """The flags' ``SamplingConfig`` (``cfg_scale``: another scale than --cfg-scale, for a sweep)."""
    if args.draft_tokens > 1 and args.cfg_interval >= 0:
        raise ConfigError("--cfg-interval: not with --draft-tokens (register drafting guides every token)")
    return SamplingConfig(
        cfg_scale=args.cfg_scale if cfg_scale is None else cfg_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        cfg_interval=args.cfg_interval,
    )


def resolve_tokenizer(args: argparse.Namespace) -> tuple[str | None, str, str | None]:
    """(kind or None, path, expected checksum): the flag, else ``tokenizer.json`` recorded in an export."""
    info = read_export_tokenizer(args.ckpt) if Path(args.ckpt).is_dir() else {}
    if args.tokenizer_path:
        return args.tokenizer, args.tokenizer_path, info.get("checksum")
    if info.get("kind") in KINDS and info.get("path"):
        return info["kind"], info["path"], info.get("checksum")
    raise ConfigError("--tokenizer-path: required (no tokenizer is recorded with this checkpoint)")


def fetch_checkpoint(args: argparse.Namespace) -> None:
    """--ckpt as a local path: a Hugging Face Hub id is downloaded now, or read from the local cache
    offline (one line naming the id and the cache folder when it can be had neither way, exit 4)."""
    if not Path(args.ckpt).exists() and is_hub_name(args.ckpt):
        args.ckpt = str(locate_checkpoint(args.ckpt))


def input_problems(args: argparse.Namespace) -> list[str]:
    """What is missing among --ckpt and the tokenizer, each named (the caller reports them together)."""
    problems = []
    local = Path(args.ckpt).exists()
    if not local:
        problems.append(f"--ckpt {args.ckpt}: no such checkpoint file, directory or Hub id")
    try:
        _, path, _ = resolve_tokenizer(args)
        if not Path(path).is_file():
            where = "--tokenizer-path" if args.tokenizer_path else "the tokenizer recorded in the export"
            problems.append(
                f"{where}: {path}: no such file" + ("" if args.tokenizer_path else " (pass --tokenizer-path)")
            )
    except ConfigError as error:
        if local:  # without the checkpoint, what it records is unknown
            problems.append(str(error))
    return problems


def check_inputs(problems: list[str]) -> None:
    """One line for one problem, a list for several (exit 4)."""
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{len(problems)} inputs are missing or unreadable:\n  " + "\n  ".join(problems))


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, str]:
    """The model on ``device`` in eval mode, in its precision (bf16 keeps RoPE in fp32), and the precision's name.
    A model that cannot draft ``--draft-tokens`` is refused here, before any work."""
    model = GPT.from_pretrained(args.ckpt, size=args.size, trust=args.trust_checkpoint).to(device).eval()
    if args.draft_tokens > 1:
        check_draft_tokens(args.draft_tokens, *trained_raster_offsets(model))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # RoPE stays fp32
    return model, precision


def load_decoder(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, dict[str, Any]]:
    """The decoder (codes -> uint8 images on ``device``), its downsampling factor, and its record for results."""
    kind, path, checksum = resolve_tokenizer(args)
    kind = kind or tokenizer_kind(path)
    try:
        tokenizer = load_tokenizer(kind, path)
    except (ValueError, InputError) as error:
        raise InputError(f"--tokenizer-path {path}: not a readable {kind} tokenizer ({error})") from None
    if checksum and tokenizer.checksum != checksum:
        raise InputError(f"{path} is not the tokenizer the training shards were made with (checksum differs)")
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer = tokenizer.to(device)
    try:
        decode = uint8_decoder(tokenizer, args.decode_precision)
    except ValueError as error:
        raise ConfigError(f"--decode-precision {args.decode_precision}: {error}") from None
    return decode, tokenizer.downsample, {"kind": kind, "path": str(path), "sha256": tokenizer.checksum}
