"""A tiny causal LM, its word tokenizer and GSM8K-shaped data: the text path offline, on CPU, in seconds.

    python -m mutor_vision.text.tiny --out runs/text/tiny
    python train_sft.py --config configs/text/tiny_cpu.yaml
    python eval/gsm8k.py --ckpt runs/text/tiny_cpu/checkpoints/step_00000080/export \\
        --data runs/text/tiny/test.jsonl --max-new-tokens 24 --out runs/text/tiny_cpu/gsm8k.json

Writes ``DIR/model/`` (a randomly initialised Llama with its tokenizer, Hugging Face format through
``save_pretrained``), ``DIR/train.jsonl`` and ``DIR/test.jsonl`` (``question``/``answer`` records whose
answers end in ``#### <number>``, like GSM8K). Nothing is downloaded. The same builder serves the
tests and benchmarks (:func:`tiny_causal_lm`, :func:`mutor_vision.text.data.word_tokenizer`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from mutor_vision.cli import HelpFormatter, run_command
from mutor_vision.config import check
from mutor_vision.text.config import GSM8K_ANSWER, GSM8K_PROMPT
from mutor_vision.text.data import word_tokenizer

KINDS = ("llama", "gemma", "qwen2")
# (question, worked answer, result) templates over two small numbers a, b.
PROBLEMS = (
    ("Tom has {a} apples and buys {b} more. How many apples does he have?", "{a} + {b} = {r}", lambda a, b: a + b),
    ("A box holds {a} eggs. How many eggs are in {b} boxes?", "{a} * {b} = {r}", lambda a, b: a * b),
    ("Sara has {a} pages left and reads {b}. How many pages are left?", "{a} - {b} = {r}", lambda a, b: a - b),
)


def tiny_causal_lm(
    vocab_size: int,
    kind: str = "llama",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
):
    """A randomly initialised Llama, Gemma or Qwen2 of ``hidden_size`` (4 heads, 2 KV heads), in eval mode."""
    # lazy: Hugging Face libraries (the `text` extra) load only where used
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind not in KINDS:
        raise ValueError(f"kind: one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation=attn_implementation, pad_token_id=0,
    )  # fmt: skip
    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(head_dim=hidden_size // 4, **common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def arithmetic_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` GSM8K-shaped problems (``question``, ``answer`` ending in ``#### <number>``), seeded."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        question, worked, result = PROBLEMS[index % len(PROBLEMS)]
        a, b = rng.randint(2, 12), rng.randint(1, 9)
        a = max(a, b)  # subtraction stays non-negative
        r = result(a, b)
        records.append({"question": question.format(a=a, b=b), "answer": f"{worked.format(a=a, b=b, r=r)} #### {r}"})
    return records


def write_tiny(
    out: Path, train_rows: int = 64, test_rows: int = 16, seed: int = 0, kind: str = "llama", hidden_size: int = 64
) -> dict[str, Path]:
    """Write the tiny model + tokenizer and the two JSONL files under ``out``; returns their paths."""
    train, test = arithmetic_records(train_rows, seed), arithmetic_records(test_rows, seed + 1)
    # The tokenizer knows every word of the data as templated for training and evaluation, and every
    # number up to the largest result: nothing in the tiny task is <unk>.
    texts = [GSM8K_PROMPT.format(prompt=r["question"]) + GSM8K_ANSWER.format(answer=r["answer"]) for r in train + test]
    tokenizer = word_tokenizer([*texts, " ".join(str(n) for n in range(12 * 12 + 1))])
    model = tiny_causal_lm(len(tokenizer), kind, seed=seed, hidden_size=hidden_size)
    paths = {"model": out / "model", "train": out / "train.jsonl", "test": out / "test.jsonl"}
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    for name, rows in (("train", train), ("test", test)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def make_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m mutor_vision.text.tiny",
        description=doc,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/text/tiny"), help="the directory to write")
    parser.add_argument("--kind", choices=KINDS, default="llama", help="the model family")
    parser.add_argument("--hidden-size", type=int, default=64, help="the model width")
    parser.add_argument("--train-rows", type=int, default=64, help="records in train.jsonl")
    parser.add_argument("--test-rows", type=int, default=16, help="records in test.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in ``mutor_vision/cli.py``."""
    parser = make_parser()
    args = parser.parse_args(argv)

    def body() -> None:
        check(args.hidden_size >= 8 and args.hidden_size % 4 == 0, "--hidden-size", "a multiple of 4 (4 heads), >= 8")
        check(args.train_rows >= 1 and args.test_rows >= 1, "--train-rows/--test-rows", "must be >= 1")
        paths = write_tiny(args.out, args.train_rows, args.test_rows, args.seed, args.kind, args.hidden_size)
        for name, path in paths.items():
            print(f"{name}: {path}")

    return run_command("mutor_vision.text.tiny", body)


if __name__ == "__main__":
    sys.exit(main())
