"""GSM8K accuracy with batched greedy decoding, scored by the MuToR authors' protocol and a lenient one.

    python eval/gsm8k.py --ckpt runs/text/gsm8k_mutor/checkpoints/step_00003735/export --out acc.json
    python eval/gsm8k.py --ckpt /models/gemma-2b --hf-name gsm8k --hf-config main --split test --out acc.json

Defaults follow the authors: up to 512 new tokens, greedy, and the answer is the first
``#### <number>`` of the generation compared as a string with the reference's after removing
commas, with no fallback (``--scoring authors``). ``lenient`` compares numbers ("18.0" = "18") and
falls back to the last number of the text. Both accuracies are in the results; ``--scoring`` picks
the one reported as ``accuracy``. An export brings its prompt template and prompt attention: a model
trained with a bidirectional prompt is prefilled bidirectionally.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mutor_vision.cli import run_command, setup_logging
from mutor_vision.text.answers import answers_match, authors_match
from mutor_vision.text.config import GSM8K_PROMPT
from mutor_vision.text.data import read_records
from mutor_vision.text.evaluate import (
    drafting_registers,
    evaluate_answers,
    load_for_generation,
)

SCORERS = {"authors": authors_match, "lenient": answers_match}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a train_sft.py export or a Hugging Face model directory")
    p.add_argument("--base-model", default=None, help="override the base model recorded in a LoRA export")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--data", default=None, help="a local JSONL file with question/answer fields")
    p.add_argument("--hf-name", default="gsm8k")
    p.add_argument("--hf-config", default="main")
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--draft-tokens", type=int, default=1, help="k > 1: the export's registers draft k - 1 tokens")
    p.add_argument("--scoring", choices=sorted(SCORERS), default="authors")
    p.add_argument("--prompt-template", default=None, help="default: the export's (else the GSM8K template)")
    p.add_argument("--limit", type=int, default=None, help="the first N problems only")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    records = read_records(args.data, None if args.data else args.hf_name, args.hf_config, args.split)
    records = records[: args.limit] if args.limit else records
    model, tokenizer, info = load_for_generation(args.ckpt, args.base_model, args.attn_implementation, args.device)
    registers = drafting_registers(args.ckpt, info, model, args.draft_tokens)
    return evaluate_answers(
        model, tokenizer, records, args.prompt_template or info.get("prompt_template", GSM8K_PROMPT), "question",
        "answer", SCORERS, args.scoring, info.get("prompt_attention", "causal"), args.max_new_tokens,
        args.batch_size, args.out, extra={"checkpoint": str(args.ckpt), "benchmark": "gsm8k"},
        registers=registers, draft_tokens=args.draft_tokens,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("eval/gsm8k.py", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
