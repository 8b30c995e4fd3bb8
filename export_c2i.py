"""Hand a trained model on: a release folder with its weights, records and model card, and the same
weights in the form LlamaGen's own scripts load.

    python export_c2i.py --ckpt runs/c2i/b_mutor2d/checkpoints/step_00360000/export --out release/b_mutor2d \\
        --results runs/eval/b_mutor2d/results.json
    python export_c2i.py --ckpt EXPORT --out release/b --hub-id me/mutor2d-b   # the card loads it from the Hub

Writes into --out: model.safetensors and config.json (this project's export: GPT.from_pretrained,
sample_c2i.py and eval/fid.py read it), the export's tokenizer.json, data.json and training.json
when it has them, README.md (the model card: architecture, the registers used in training, data,
steps, the evaluation table of every --results, how to load it) and llamagen.pt (``{"model": ...}``,
LlamaGen's keys, no register vector): LlamaGen's sample_c2i.py and sample_c2i_ddp.py load it as
--gpt-ckpt. Each --results must be eval/fid.py's results of these weights (checked against the
fingerprint in the settings stamp beside it). Upload the folder as it is to a Hugging Face Hub model
repository, and GPT.from_pretrained("<hub id>") loads it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mutor_vision.cli import TOOL_EXIT_CODES, HelpFormatter, run_command, setup_logging
from mutor_vision.errors import InputError
from mutor_vision.evaluation.config import weights_checksum
from mutor_vision.evaluation.run import SETTINGS
from mutor_vision.models import GPT
from mutor_vision.models.card import model_card
from mutor_vision.models.checkpoint import (
    LLAMAGEN_NAME,
    locate_checkpoint,
    read_export_data,
    read_export_tokenizer,
    read_export_training,
    save_export,
    save_llamagen,
)

log = logging.getLogger("export_c2i")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_c2i.py", description=__doc__, formatter_class=HelpFormatter, epilog=TOOL_EXIT_CODES
    )
    p.add_argument("--ckpt", required=True, help="an export directory, a .safetensors file or a LlamaGen .pt")
    p.add_argument("--size", default="GPT-B", help="the architecture of an official file (exports carry theirs)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling (LlamaGen's DDP files)")
    p.add_argument("--out", type=Path, required=True, help="the release folder written")
    p.add_argument(
        "--results", type=Path, action="append", default=[], help="eval/fid.py's results.json of these weights "
        "(repeatable): the card's evaluation table"
    )  # fmt: skip
    p.add_argument("--title", default=None, help="the card's title (default: the --out folder's name)")
    p.add_argument("--hub-id", default=None, help="the Hugging Face Hub id the card says to load it from")
    p.add_argument("--no-llamagen", dest="llamagen", action="store_false", help="skip llamagen.pt")
    return p


def read_results(paths: list[Path], model: GPT) -> list[dict[str, Any]]:
    """Each results.json, after checking that it measured ``model``'s weights (in its precision)."""
    evaluations = []
    for path in paths:
        if not path.is_file():
            raise InputError(f"--results {path}: no such file")
        try:
            results = json.loads(path.read_text())
            stamp = json.loads((path.parent / SETTINGS).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"--results {path}: not eval/fid.py's results with its {SETTINGS} ({error})") from None
        # eval/fid.py fingerprints the weights in the precision it sampled in (bf16 on CUDA by default).
        measured = copy.deepcopy(model).to(torch.bfloat16) if results.get("precision") == "bf16" else model
        if stamp.get("model", {}).get("checksum") != weights_checksum(measured):
            raise InputError(f"--results {path}: measured other weights than --ckpt (the stamp's checksum differs)")
        evaluations.append(results)
    return evaluations


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    source = locate_checkpoint(args.ckpt)
    model = GPT.from_pretrained(source, size=args.size, trust=args.trust_checkpoint).eval()
    evaluations = read_results(args.results, model)
    records = {"tokenizer": read_export_tokenizer(source), "data": read_export_data(source)}
    records["training"] = read_export_training(source)
    llamagen = LLAMAGEN_NAME if args.llamagen else None
    card = model_card(
        args.title or args.out.resolve().name, model.config, records["tokenizer"], records["data"],
        records["training"], evaluations, llamagen, location=args.hub_id or str(args.out),
    )  # fmt: skip
    state = model.state_dict()
    save_export(args.out, state, model.config, *(records[k] or None for k in ("tokenizer", "data", "training")), card)
    if llamagen:
        save_llamagen(args.out / llamagen, state)
    written = sorted(path.name for path in args.out.iterdir() if not path.name.startswith("."))
    log.info("wrote %s: %s", args.out, ", ".join(written))
    return {"out": str(args.out), "files": written}


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("export_c2i.py", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
