"""Sample a class-conditional model with CFG and report FID / IS / Precision / Recall (ADM protocol).

    python eval/fid.py --ckpt runs/c2i/llamagen_b_mutor2d/checkpoints/step_00360000/export \\
        --tokenizer-path vq_ds16_c2i.pt --ref-batch VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out runs/eval/b_mutor2d
    accelerate launch --num_processes 8 eval/fid.py ...       # ranks sample disjoint slices
    python eval/fid.py --ckpt c2i_B_256.pt --size GPT-B --trust-checkpoint ...   # an official file
    python eval/fid.py --ckpt EXPORT --ref-batch ... --num-samples 10000 --cfg-scales 1.5,1.75,2.0,2.25 \\
        --out runs/eval/b_sweep                   # a CFG sweep: a sub-run per scale, sweep.json/.md/.png

    python eval/fid.py --ckpt EXPORT --inception-weights random:0 --num-samples 64 --ref-folder IMAGES \\
        --out /tmp/smoke          # a smoke test without the real files: random Inception, meaningless numbers

Settings default to the paper's FID protocol: 50,000 samples, CFG 2.0 on logits, temperature 1.0,
top-k 0, top-p 1.0, and where the paper is silent LlamaGen's sample_c2i_ddp.py: labels uniform at
random (--per-class for i % classes). A run needs a reference for FID, precision and recall:
without --ref-batch / --ref-folder it stops at once unless --no-reference asks for IS alone.
Samples are written as PNGs as they come; a rerun with the same --out skips existing indices.
Outputs: samples/, samples.npz (ADM ``arr_0``), labels.npy, grid.png, results.json (every setting,
the package version, and the sha256 of the Inception weights, the reference and the tokenizer).
Compute FID against the ADM reference batch (ImageNet *train* statistics), never against the
validation set. Every input is checked before any work; all problems are reported together (exit 4).

--cfg-scales runs one such evaluation per scale into <out>/cfg_<scale>/ (each resumable, with its
own settings stamp; the reference features are computed once), then writes <out>/sweep.json,
sweep.md (FID, IS, precision, recall per scale) and sweep.png (FID against IS), the best scale by
FID and the command of the full run at it. Every sub-run's folder is checked before any sampling.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tokenizer/, eval/

from eval.common import (
    add_model_args,
    add_sampling_args,
    check_inputs,
    fetch_checkpoint,
    input_problems,
    load_decoder,
    load_model,
    sampling_config,
)
from mutor_vision.cli import FORCE_HELP, TOOL_EXIT_CODES, HelpFormatter, run_command, setup_logging
from mutor_vision.errors import ConfigError
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
from mutor_vision.evaluation.sweep import parse_scales, run_sweep, summarise_sweep, write_sweep
from mutor_vision.models import GPT
from mutor_vision.models.checkpoint import read_export_data
from mutor_vision.peers import peers
from mutor_vision.processes import DEFAULT_COLLECTIVE_TIMEOUT_S, main_process_holds
from tokenizer.preprocess import center_crop_adm

log = logging.getLogger("eval.fid")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval/fid.py", description=__doc__, formatter_class=HelpFormatter, epilog=TOOL_EXIT_CODES
    )
    add_model_args(p)
    p.add_argument("--num-samples", type=int, default=50_000, help="images sampled in all (over every rank)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--random-labels",
        dest="per_class",
        action="store_false",
        default=False,
        help="labels uniform at random, from --seed (LlamaGen's sample_c2i_ddp.py; the default)",
    )
    labels.add_argument(
        "--per-class", dest="per_class", action="store_true", help="labels i %% classes: each class equally often"
    )
    add_sampling_args(p, cfg_scale=2.0, top_k=0)
    p.add_argument(
        "--cfg-scales",
        default=None,
        help="a CFG sweep instead of --cfg-scale: comma-separated scales, a sub-run each (needs a reference)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (per rank)")
    p.add_argument("--feature-batch-size", type=int, default=64, help="images per Inception batch")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="sample classes 0..N-1 (default: those the training data held, recorded in the export; else the model's)",
    )
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref-batch", type=Path, default=None, help="ADM reference npz (mu, sigma, arr_0)")
    ref.add_argument("--ref-folder", type=Path, default=None, help="a folder of reference images")
    ref.add_argument(
        "--no-reference",
        action="store_true",
        help="no reference: the Inception Score alone (no FID, precision, recall)",
    )
    p.add_argument(
        "--ref-cache",
        type=Path,
        default=Path.home() / ".cache" / "mutor_vision" / "reference",
        help="reference features, keyed by the reference's and the weights' content",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache); random:SEED for a smoke "
        "test with random weights (meaningless numbers)",
    )
    p.add_argument("--download-inception", action="store_true", help="allow fetching the Inception weights")
    p.add_argument("--no-npz", dest="save_npz", action="store_false", help="skip the ADM samples.npz")
    p.add_argument(
        "--collective-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S, help="seconds a collective waits "
        "for a rank that does not come (several processes; long waits notice a lost machine sooner)"
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the output folder, held by one run at a time")
    p.add_argument("--force", action="store_true", help=FORCE_HELP.format(what="--out"))
    return p


def check_all_inputs(args: argparse.Namespace) -> None:
    """Every input file that is missing or unreadable, reported together before any work (exit 4)."""
    problems = input_problems(args)
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
    check_inputs(problems)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The flags' settings (checked here, before any input is read); the classes are resolved later."""
    return EvalConfig(
        out_dir=args.out,
        num_samples=args.num_samples,
        per_class=args.per_class,
        num_classes=args.num_classes,
        sampling=sampling_config(args),
        draft_tokens=args.draft_tokens,
        decode_precision=args.decode_precision,
        batch_size=args.batch_size,
        feature_batch_size=args.feature_batch_size,
        save_npz=args.save_npz,
        compile=args.compile,
        device=args.device,
        collective_timeout_s=args.collective_timeout,
    )


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
    """Evaluate per the command line; the results (a sweep's summary) on rank 0, None on other ranks."""
    args = make_parser().parse_args(argv)
    config = eval_config(args)
    scales = parse_scales(args.cfg_scales) if args.cfg_scales is not None else None
    if scales is not None and args.ref_batch is None and args.ref_folder is None:
        raise ConfigError("--cfg-scales: a sweep picks its scale by FID; give --ref-batch or --ref-folder")
    if args.ref_batch is None and args.ref_folder is None and not args.no_reference:
        raise ConfigError(
            "no reference: FID, precision and recall need --ref-batch (ADM's VIRTUAL_imagenet256_labeled.npz) or "
            "--ref-folder; --no-reference computes the Inception Score alone"
        )
    fetch_checkpoint(args)
    check_all_inputs(args)
    state = evaluation_state(args.device, args.collective_timeout)  # first: each rank's device, gloo on CPU
    # One run per --out (mutor_vision/locks.py): two would write and skip each other's samples.
    with main_process_holds(state, args.out, "--out", force=args.force):
        return evaluate_held(args, state, config, scales, sys.argv[1:] if argv is None else argv)


def evaluate_held(
    args: argparse.Namespace, state, config: EvalConfig, scales: list[float] | None, argv: list[str]
) -> dict | None:
    """Load, sample and measure into ``args.out`` (held by this run); the results on rank 0."""
    device = state.device
    model, precision = load_model(args, device)
    config = config.replace(num_classes=data_classes(args, model))
    decode, downsample, tokenizer = load_decoder(args, device)
    extractor = inception_extractor(args.inception_weights, allow_download=args.download_inception)
    resolution = model.config.grid_size * downsample
    if state.is_main_process:  # warns, before hours of sampling, when --out cannot hold the samples
        check_space(args.out, args.num_samples * len(scales or [0]), resolution, args.save_npz)

    def load_reference():
        if args.ref_batch is not None:
            return reference_from_npz(args.ref_batch, extractor, args.feature_batch_size, device, args.ref_cache)
        if args.ref_folder is not None:
            return reference_from_folder(
                args.ref_folder, resolution, center_crop_adm, extractor, args.feature_batch_size, device, args.ref_cache
            )
        log.info("--no-reference: the Inception Score alone")
        return None

    # Rank 0 computes and caches the reference features, then the rest read them; they wait for as
    # long as rank 0 lives, and stop within seconds when it does not (mutor_vision/peers.py).
    reference = load_reference() if state.is_main_process else None
    peers().wait("reference")
    if not state.is_main_process:
        reference = load_reference()
    notes = {
        "checkpoint": str(args.ckpt),
        "tokenizer": tokenizer,
        "precision": precision,
        "compile": args.compile,
        # cuDNN's TF32 for the decoder's convolutions (PyTorch's default, and LlamaGen's setting)
        "decode_tf32_convolutions": device.type == "cuda" and torch.backends.cudnn.allow_tf32,
        "resolution": resolution,
    }
    config = config.replace(notes=notes)
    scoring = Scoring(extractor, reference)
    if scales is None:
        return evaluate(model, decode, scoring, config)
    rows = run_sweep(model, decode, scoring, config, scales)
    if rows is None:
        return None
    summary = summarise_sweep(rows)
    summary["full_run"] = full_run_command(argv, summary["best"]["cfg_scale"], args.out)
    write_sweep(args.out, summary)
    return summary


def full_run_command(argv: list[str], scale: float, out: Path) -> str:
    """This sweep's command line as the 50,000-sample run at ``scale`` (into ``<out>/cfg_<scale>_50k``)."""
    kept, args = [], list(argv)
    dropped = {"--cfg-scales", "--cfg-scale", "--num-samples", "--out"}
    while args:
        arg = args.pop(0)
        name = arg.split("=", 1)[0]
        if name in dropped:
            if "=" not in arg and args:
                args.pop(0)
            continue
        kept.append(arg)
    full = [*kept, "--cfg-scale", f"{scale:g}", "--num-samples", "50000", "--out", str(out / f"cfg_{scale:g}_50k")]
    return "python eval/fid.py " + shlex.join(full)


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
