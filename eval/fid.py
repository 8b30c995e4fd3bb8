"""Sample a class-conditional model with CFG and report FID / IS / Precision / Recall (ADM protocol).

    python eval/fid.py --ckpt runs/c2i/llamagen_b_mutor2d/checkpoints/step_00360000/export \\
        --vq-ckpt vq_ds16_c2i.pt --ref-batch VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/eval/b_mutor2d
    accelerate launch --num_processes 8 eval/fid.py ...       # ranks sample disjoint slices
    python eval/fid.py --ckpt c2i_B_256.pt --size GPT-B --trust-checkpoint ...   # an official file

    python eval/fid.py --ckpt EXPORT --inception-weights random:0 --num-samples 64 --out /tmp/smoke
                                  # a smoke test without the real files: random Inception, meaningless numbers

Settings default to the paper's FID protocol: 50,000 samples (50 per class), CFG 2.0 on logits,
temperature 1.0, top-k 0, top-p 1.0. Samples are written as PNGs as they come; a rerun with the
same --out skips existing indices. Outputs: samples/, samples.npz (ADM ``arr_0``), labels.npy,
grid.png, results.json (every setting, the package version, and the sha256 of the Inception
weights, the reference and the tokenizer). Compute FID against the ADM reference batch (ImageNet
*train* statistics), never against the validation set. Every input is checked before any work;
all problems are reported together (exit 4).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tokenizer/

from mutor_vision.cli import FORCE_HELP, TOOL_EXIT_CODES, run_command, setup_logging
from mutor_vision.core.drafting import check_draft_tokens
from mutor_vision.errors import ConfigError, InputError
from mutor_vision.evaluation import (
    EvalConfig,
    Scoring,
    evaluate,
    evaluation_state,
    inception_extractor,
    reference_from_folder,
    reference_from_npz,
)
from mutor_vision.evaluation.features import RANDOM_WEIGHTS, find_inception_weights
from mutor_vision.evaluation.samples import check_space
from mutor_vision.models import GPT, SamplingConfig
from mutor_vision.models.checkpoint import read_export_data, read_export_tokenizer
from mutor_vision.models.sampling import trained_raster_offsets
from mutor_vision.processes import main_process_holds
from tokenizer import DECODE_PRECISIONS, KINDS, load_tokenizer, tokenizer_kind, uint8_decoder
from tokenizer.preprocess import center_crop_adm

log = logging.getLogger("eval.fid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOOL_EXIT_CODES
    )
    p.add_argument("--ckpt", required=True, help="an export dir, a .safetensors file, or an official LlamaGen .pt")
    p.add_argument("--size", default="GPT-B", help="architecture for official files (exports carry their config)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling (LlamaGen DDP files)")
    p.add_argument("--num-samples", type=int, default=50_000)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--per-class", dest="per_class", action="store_true", default=True, help="balanced (default)")
    labels.add_argument("--random-labels", dest="per_class", action="store_false")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (per rank)")
    p.add_argument("--feature-batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="each decode step as a CUDA graph (CUDA only)")
    p.add_argument(
        "--decode-precision",
        choices=DECODE_PRECISIONS,
        default="fp32",
        help="the VQ-16 decoder's precision: fp32 (default: LlamaGen's protocol) or bf16 (faster on a GPU, but "
        "pixels differ and FID is not comparable: docs/evaluation.md)",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=1, help="k > 1: the model's registers draft k - 1 tokens per forward"
    )
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when available")
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
        "--num-classes",
        type=int,
        default=None,
        help="sample classes 0..N-1 (default: those the training data held, recorded in the export; else the model's)",
    )
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref-batch", type=Path, default=None, help="ADM reference npz (mu, sigma, arr_0)")
    ref.add_argument("--ref-folder", type=Path, default=None, help="a folder of reference images")
    p.add_argument(
        "--ref-cache",
        type=Path,
        default=Path.home() / ".cache" / "mutor_vision" / "reference",
        help="reference features, keyed by the reference's and the weights' content (default: %(default)s)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache); random:SEED for a smoke "
        "test with random weights (meaningless numbers)",
    )
    p.add_argument("--download-inception", action="store_true", help="allow fetching the Inception weights")
    p.add_argument("--no-npz", dest="save_npz", action="store_false", help="skip the ADM samples.npz")
    p.add_argument("--out", type=Path, required=True, help="the output folder, held by one run at a time")
    p.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="--out"))
    return p.parse_args(argv)


def resolve_tokenizer(args: argparse.Namespace) -> tuple[str | None, str, str | None]:
    """(kind or None, path, expected checksum): the flag, else ``tokenizer.json`` recorded in an export."""
    info = read_export_tokenizer(args.ckpt) if Path(args.ckpt).is_dir() else {}
    if args.tokenizer_path:
        return args.tokenizer, args.tokenizer_path, info.get("checksum")
    if info.get("kind") in KINDS and info.get("path"):
        return info["kind"], info["path"], info.get("checksum")
    raise ConfigError("--tokenizer-path: required (no tokenizer is recorded with this checkpoint)")


def check_inputs(args: argparse.Namespace) -> None:
    """Every input file that is missing or unreadable, reported together before any work (exit 4)."""
    problems = []
    if not Path(args.ckpt).exists():
        problems.append(f"--ckpt {args.ckpt}: no such checkpoint")
    try:
        _, path, _ = resolve_tokenizer(args)
        if not Path(path).is_file():
            where = "--tokenizer-path" if args.tokenizer_path else "the tokenizer recorded in the export"
            problems.append(
                f"{where}: {path}: no such file" + ("" if args.tokenizer_path else " (pass --tokenizer-path)")
            )
    except ConfigError as error:
        if Path(args.ckpt).exists():  # without the checkpoint, what it records is unknown
            problems.append(str(error))
    if args.ref_batch is not None and not args.ref_batch.is_file():
        problems.append(f"--ref-batch {args.ref_batch}: no such file")
    if args.ref_folder is not None and not args.ref_folder.is_dir():
        problems.append(f"--ref-folder {args.ref_folder}: no such folder")
    weights = args.inception_weights
    if not (weights or "").startswith(RANDOM_WEIGHTS):
        try:
            find_inception_weights(weights, allow_download=args.download_inception)
        except FileNotFoundError as error:
            problems.append(str(error))
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{len(problems)} inputs are missing or unreadable:\n  " + "\n  ".join(problems))


def data_classes(args: argparse.Namespace, model: GPT) -> int:
    """How many classes to sample: --num-classes, else what the export's training data held, else the model's."""
    if args.num_classes is not None:
        return args.num_classes
    recorded = read_export_data(args.ckpt).get("num_classes") if Path(args.ckpt).is_dir() else None
    if recorded and recorded < model.config.num_classes:
        log.info(
            "sampling classes 0..%d: the training data held %d of the model's %d classes (--num-classes to change)",
            recorded - 1, recorded, model.config.num_classes,
        )  # fmt: skip
        return int(recorded)
    return model.config.num_classes


def run(argv: list[str] | None = None) -> dict | None:
    """Evaluate per the command line; the results on rank 0 (None on other ranks)."""
    args = parse_args(argv)
    config = eval_config(args)
    check_inputs(args)
    state = evaluation_state(args.device)  # first: each rank's device (cuda:<local rank>), gloo on CPU
    # One run per --out (mutor_vision/locks.py): two would write and skip each other's samples.
    with main_process_holds(state, args.out, "--out", force=args.force):
        return evaluate_held(args, state, config)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The flags' settings (checked here, before any input is read); the classes are resolved later."""
    sampling = SamplingConfig(
        cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    return EvalConfig(
        out_dir=args.out,
        num_samples=args.num_samples,
        per_class=args.per_class,
        num_classes=args.num_classes,
        sampling=sampling,
        draft_tokens=args.draft_tokens,
        decode_precision=args.decode_precision,
        batch_size=args.batch_size,
        feature_batch_size=args.feature_batch_size,
        save_npz=args.save_npz,
        compile=args.compile,
        device=args.device,
    )


def evaluate_held(args: argparse.Namespace, state, config: EvalConfig) -> dict | None:
    """Load, sample and measure into ``args.out`` (held by this run); the results on rank 0."""
    device = state.device
    model = GPT.from_pretrained(args.ckpt, size=args.size, trust=args.trust_checkpoint).to(device).eval()
    if args.draft_tokens > 1:  # a model that cannot draft is refused before any work
        check_draft_tokens(args.draft_tokens, *trained_raster_offsets(model))
    config = config.replace(num_classes=data_classes(args, model))
    kind, path, checksum = resolve_tokenizer(args)
    kind = kind or tokenizer_kind(path)
    try:
        tokenizer = load_tokenizer(kind, path)
    except (ValueError, InputError) as error:
        raise InputError(f"--tokenizer-path {path}: not a readable {kind} tokenizer ({error})") from None
    if checksum and tokenizer.checksum != checksum:
        raise InputError(f"{path} is not the tokenizer the training shards were made with (checksum differs)")
    extractor = inception_extractor(args.inception_weights, allow_download=args.download_inception)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()  # RoPE stays fp32
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer = tokenizer.to(device)
    try:
        decode = uint8_decoder(tokenizer, args.decode_precision)
    except ValueError as error:
        raise ConfigError(f"--decode-precision {args.decode_precision}: {error}") from None

    resolution = model.config.grid_size * tokenizer.downsample
    if state.is_main_process:  # warns, before hours of sampling, when --out cannot hold the samples
        check_space(args.out, args.num_samples, resolution, args.save_npz)
    reference = None
    with state.main_process_first():  # rank 0 computes and caches the reference features, the rest read them
        if args.ref_batch is not None:
            reference = reference_from_npz(args.ref_batch, extractor, args.feature_batch_size, device, args.ref_cache)
        elif args.ref_folder is not None:
            reference = reference_from_folder(
                args.ref_folder, resolution, center_crop_adm, extractor, args.feature_batch_size, device, args.ref_cache
            )
        else:
            log.warning("no --ref-batch / --ref-folder: only the Inception Score is computed")
    notes = {
        "checkpoint": str(args.ckpt),
        "tokenizer": {"kind": kind, "path": str(path), "sha256": tokenizer.checksum},
        "precision": precision,
        "compile": args.compile,
        # cuDNN's TF32 for the decoder's convolutions (PyTorch's default, and LlamaGen's setting)
        "decode_tf32_convolutions": device.type == "cuda" and torch.backends.cudnn.allow_tf32,
        "resolution": resolution,
    }
    return evaluate(model, decode, Scoring(extractor, reference), config.replace(notes=notes))


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    # A full disk: the PNGs written are kept; the same command samples only the missing ones.
    hint = "the samples written are kept: make room (or pass --no-npz), then run the same command to go on"
    # Each PNG is written atomically as it comes: a rerun with the same --out samples only the rest.
    interrupted = "the samples written are kept, the same command resumes"
    return run_command("eval/fid.py", lambda: run(argv), storage_hint=hint, interrupt_hint=interrupted)


if __name__ == "__main__":
    sys.exit(main())
