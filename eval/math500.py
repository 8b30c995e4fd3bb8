"""MATH500 accuracy: batched greedy decoding, the last ``\\boxed{...}`` answer, normalised comparison.

    python eval/math500.py --ckpt runs/text/math_mutor/checkpoints/step_NNNNNNNN/export --out math.json
    python eval/math500.py --ckpt /models/gemma-2b --data math500.jsonl --out math.json

Problems come from the Hugging Face dataset ``HuggingFaceH4/MATH-500`` (``problem``, ``answer``) or a
local JSONL with those fields. The prediction is the content of the last ``\\boxed{...}`` of the
generation; both sides are normalised the usual MATH way (spaces, ``\\left``/``\\right``, units,
``dfrac``/``tfrac``, ``\\frac12``, ``a/b``, ``0.5``, ``x = 5``; ``mutor_vision/text/answers.py``) and
compared as strings. Shares the generation and the command line of ``eval/gsm8k.py``.
"""

from __future__ import annotations

import sys

from mutor_vision.cli import run_command, setup_logging
from mutor_vision.text.answers import math_match
from mutor_vision.text.evaluate import Benchmark, benchmark_parser, run_benchmark

MATH500 = Benchmark(
    name="math500", hf_name="HuggingFaceH4/MATH-500", hf_config=None, prompt_field="problem", answer_field="answer",
    template="Problem: {prompt}\n\nSolution:", scorers={"boxed": math_match}, default_scoring="boxed",
    max_new_tokens=1024,
)  # fmt: skip


def run(argv: list[str] | None = None) -> dict:
    return run_benchmark(MATH500, benchmark_parser(__doc__, MATH500).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("eval/math500.py", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
