"""GSM8K accuracy with batched greedy decoding, scored by the MuToR authors' protocol and a lenient one.

    python eval/gsm8k.py --ckpt runs/text/gsm8k_mutor/checkpoints/step_00003735/export --out acc.json
    python eval/gsm8k.py --ckpt /models/gemma-2b --hf-name gsm8k --hf-config main --split test --out acc.json
    python eval/gsm8k.py --ckpt /models/gemma-2b --data gsm8k_test.jsonl --out acc.json   # offline

Defaults follow the authors: up to 512 new tokens, greedy, and the answer is the first
``#### <number>`` of the generation compared as a string with the reference's after removing
commas, with no fallback (``--scoring authors``). ``lenient`` compares numbers ("18.0" = "18") and
falls back to the last number of the text. Both accuracies are in the results; ``--scoring`` picks
the one reported as ``accuracy``. An export brings its prompt template and prompt attention: a model
trained with a bidirectional prompt is prefilled bidirectionally.
"""

from __future__ import annotations

import sys

from mutor_vision.cli import run_command, setup_logging
from mutor_vision.text.answers import answers_match, authors_match
from mutor_vision.text.config import GSM8K_PROMPT
from mutor_vision.text.evaluate import Benchmark, benchmark_parser, run_benchmark

GSM8K = Benchmark(
    name="gsm8k", hf_name="gsm8k", hf_config="main", prompt_field="question", answer_field="answer",
    template=GSM8K_PROMPT, scorers={"authors": authors_match, "lenient": answers_match}, default_scoring="authors",
    max_new_tokens=512,
)  # fmt: skip


def run(argv: list[str] | None = None) -> dict:
    return run_benchmark(GSM8K, benchmark_parser(__doc__, GSM8K).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    setup_logging()
    return run_command("eval/gsm8k.py", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
