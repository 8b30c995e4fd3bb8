"""MATH500 accuracy: batched greedy decoding, the last ``\\boxed{...}`` answer, normalised comparison.

    python eval/math500.py --ckpt runs/text/math_mutor/checkpoints/step_NNNNNNNN/export --out math.json
    python eval/math500.py --ckpt /models/gemma-2b --data math500.jsonl --out math.json

Problems come from the Hugging Face dataset ``HuggingFaceH4/MATH-500`` (``problem``, ``answer``) or a
local JSONL with those fields. The prediction is the content of the last ``\\boxed{...}`` of the
generation; both sides are normalised the usual MATH way (spaces, ``\\left``/``\\right``, units,
``dfrac``/``tfrac``, ``\\frac12``, ``a/b``, ``0.5``, ``x = 5``; ``mutor_vision/text/answers.py``) and
compared as strings. Shares the generation of ``eval/gsm8k.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mutor_vision.cli import run_command, setup_logging
from mutor_vision.text.answers import math_match
from mutor_vision.text.data import read_records
from mutor_vision.text.evaluate import (
    drafting_registers,
    evaluate_answers,
    load_for_generation,
)

MATH_PROMPT = "Problem: {prompt}\n\nSolution:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a train_sft.py export or a Hugging Face model directory")
    p.add_argument("--base-model", default=None, help="override the base model recorded in a LoRA export")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--data", default=None, help="a local JSONL file with problem/answer fields")
    p.add_argument("--hf-name", default="HuggingFaceH4/MATH-500")
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--draft-tokens", type=int, default=1, help="k > 1: the export's registers draft k - 1 tokens")
    p.add_argument("--prompt-template", default=None, help=f"default: the export's, else {MATH_PROMPT!r}")
    p.add_argument("--limit", type=int, default=None, help="the first N problems only")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    records = read_records(args.data, None if args.data else args.hf_name, None, args.split)
    records = records[: args.limit] if args.limit else records
    model, tokenizer, info = load_for_generation(args.ckpt, args.base_model, args.attn_implementation, args.device)
    registers = drafting_registers(args.ckpt, info, model, args.draft_tokens)
    return evaluate_answers(
        model, tokenizer, records, args.prompt_template or info.get("prompt_template", MATH_PROMPT), "problem",
        "answer", {"boxed": math_match}, "boxed", info.get("prompt_attention", "causal"), args.max_new_tokens,
        args.batch_size, args.out, extra={"checkpoint": str(args.ckpt), "benchmark": "math500"},
        registers=registers, draft_tokens=args.draft_tokens,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("eval/math500.py", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
