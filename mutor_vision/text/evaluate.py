"""Accuracy of a fine-tuned model on question/answer data: GSM8K and MATH500 share this run.

The model comes from a ``train_sft.py`` export (its base model, LoRA flag, prompt template and
prompt attention travel with it) or a plain Hugging Face model directory. Generation is greedy and
batched (``mutor_vision/text/generate.py``); every scorer is applied to every prediction, the
primary one gives ``accuracy``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mutor_vision.cli import HelpFormatter
from mutor_vision.core.drafting import DecodeStats, check_draft_tokens
from mutor_vision.errors import ConfigError, InputError
from mutor_vision.files import atomic_write_json
from mutor_vision.text.adapter import MASK_FORMS, RegisterEmbedding
from mutor_vision.text.data import read_records
from mutor_vision.text.export import model_directory, read_register_vector, read_text_info
from mutor_vision.text.generate import generate_texts
from mutor_vision.text.hub import ModelSource, from_pretrained, gather, is_hub_name, locate_model

log = logging.getLogger(__name__)
Scorer = Callable[[str, str], bool]  # (prediction, reference) -> correct
OFFLINE_HELP = (
    "give --ckpt a local directory and --data a local JSONL file; a hub name works only from the local "
    "Hugging Face cache (HF_HUB_OFFLINE=1 is honoured), else the command stops at once naming the flag "
    "(exit 4). python -m mutor_vision.text.tiny --out DIR writes a tiny model and data sets to try it."
)
EVAL_EXIT_CODES = (
    "exit codes: 0 done; 1 a bug (with its traceback); 2 a bad flag; 4 missing or bad input (model, data). "
    "Errors 2 and 4 print one line naming the flag or the file."
)


def locate_checkpoint(
    ckpt: str | Path, base_model: str | None = None
) -> tuple[ModelSource, ModelSource | None, dict[str, Any] | None]:
    """(the model, the LoRA base model or None, the export's ``mutor_text.json`` or None), decided in
    seconds: ``ckpt`` is a ``train_sft.py`` export, a Hugging Face model directory, or a hub name
    (downloaded, or from the local cache); a LoRA export's base model is ``base_model`` or its own."""
    if not Path(ckpt).is_dir():
        if not is_hub_name(str(ckpt)):
            raise InputError(
                f"--ckpt {str(ckpt)!r}: no such directory (a train_sft.py export, a Hugging Face model "
                "directory, or a hub name)"
            )
        return locate_model(str(ckpt), "--ckpt"), None, None
    recorded = read_text_info(Path(ckpt))
    source = ModelSource(str(model_directory(Path(ckpt), recorded)), "--ckpt", local_files_only=True)
    base = None
    if recorded and recorded.get("lora"):
        base = locate_model(base_model or recorded["base_model"], "--base-model")
    return source, base, recorded


def load_for_generation(
    ckpt: str | Path,
    base_model: str | None = None,
    attn: str = "sdpa",
    device: str = "auto",
    located: tuple[ModelSource, ModelSource | None, dict[str, Any] | None] | None = None,
):
    """(model, tokenizer, info): a text export, a Hugging Face directory or a hub name, in eval mode on
    the device (``located``: :func:`locate_checkpoint`'s answer, when already had).

    Generation runs with ``sdpa`` (or ``eager``) whatever the model was trained with: the weights do
    not depend on the attention implementation, and decoding takes boolean or additive masks.
    """
    from transformers import (  # lazy: Hugging Face libraries (the `text` extra) load only where used
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    source, base, recorded = located or locate_checkpoint(ckpt, base_model)
    info = recorded or {}
    on_cuda = device == "auto" and torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda else torch.float32
    if base is not None:
        from peft import PeftModel  # lazy: peft is a slow import; only LoRA exports need it

        model = PeftModel.from_pretrained(
            from_pretrained(AutoModelForCausalLM, base, dtype=dtype, attn_implementation=attn), source.name
        )
    else:
        model = from_pretrained(AutoModelForCausalLM, source, dtype=dtype, attn_implementation=attn)
    tokenizer = from_pretrained(AutoTokenizer, source)
    model.to("cuda" if on_cuda else "cpu")
    return model.eval(), tokenizer, info | {"attn_implementation": attn}


def evaluate_answers(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    template: str,
    prompt_field: str,
    answer_field: str,
    scorers: dict[str, Scorer],
    primary: str,
    prompt_attention: str,
    max_new_tokens: int,
    batch_size: int,
    out: Path,
    extra: dict[str, Any] | None = None,
    registers=None,
    draft_tokens: int = 1,
) -> dict[str, Any]:
    """Generate an answer to every record, score it with every scorer, write ``out`` (JSON).

    ``draft_tokens > 1`` drafts with the export's registers (:func:`drafting_registers`): the same
    answers, and the forwards per token are recorded."""
    missing = [i for i, r in enumerate(records) if prompt_field not in r or answer_field not in r]
    if missing:
        raise InputError(f"record {missing[0]}: needs the fields {prompt_field!r} and {answer_field!r}")
    attn = model.config._attn_implementation
    if attn not in ("sdpa", "eager"):
        raise InputError(f"generation needs attn_implementation sdpa or eager, the model has {attn!r}")
    prompts = [template.format(prompt=r[prompt_field]) for r in records]
    stats = DecodeStats()
    predictions = generate_texts(
        model, tokenizer, prompts, max_new_tokens, prompt_attention, MASK_FORMS[attn], batch_size,
        registers=registers, draft_tokens=draft_tokens, stats=stats,
    )  # fmt: skip
    rows, correct = [], dict.fromkeys(scorers, 0)
    for record, prediction in zip(records, predictions, strict=True):
        verdicts = {name: bool(score(prediction, str(record[answer_field]))) for name, score in scorers.items()}
        for name, ok in verdicts.items():
            correct[name] += ok
        rows.append({"prediction": prediction, **{f"correct_{name}": ok for name, ok in verdicts.items()}})
    total = max(len(records), 1)
    results = {
        "accuracy": correct[primary] / total,
        "scoring": primary,
        **{f"accuracy_{name}": count / total for name, count in correct.items()},
        "correct": correct,
        "total": len(records),
        "prompt_attention": prompt_attention,
        "prompt_template": template,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "draft_tokens": draft_tokens,
        "tokens_per_forward": stats.tokens_per_forward,
        **(extra or {}),
        "samples": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    log.info("accuracy (%s) %.4f; %s", primary, results["accuracy"],
             " ".join(f"{n}={correct[n] / total:.4f}" for n in scorers))  # fmt: skip
    return results


def drafting_registers(ckpt: str | Path, info: dict[str, Any], model, draft_tokens: int):
    """The export's register vector for ``draft_tokens > 1`` (None for 1), checked against its training."""
    if draft_tokens <= 1:
        return None
    if info.get("mode") != "mutor1d":  # read_text_info gives an older export's "name" as "mode"
        raise ConfigError(
            f"--draft-tokens: {ckpt} was trained without registers (registers.mode {info.get('mode', 'unknown')})"
        )
    d_max = int(info.get("d_max", 0))
    check_draft_tokens(draft_tokens, range(1, d_max + 1), f"registers.mode mutor1d, d_max {d_max}")
    registers = RegisterEmbedding(model.config.hidden_size)
    with torch.no_grad():
        registers.vector.copy_(read_register_vector(ckpt))
    return registers.to(next(model.parameters()).device)


@dataclass(frozen=True)
class Benchmark:
    """What differs between the answer benchmarks: data source and fields, template, scorers."""

    name: str  # "gsm8k", "math500"
    hf_name: str
    hf_config: str | None
    prompt_field: str
    answer_field: str
    template: str  # used when the export records none
    scorers: dict[str, Scorer]
    default_scoring: str
    max_new_tokens: int


def benchmark_parser(doc: str, bench: Benchmark) -> argparse.ArgumentParser:
    """The command line shared by ``eval/gsm8k.py`` and ``eval/math500.py``."""
    p = argparse.ArgumentParser(
        prog=f"eval/{bench.name}.py",
        description=doc,
        formatter_class=HelpFormatter,
        epilog=f"offline: {OFFLINE_HELP}\n\n{EVAL_EXIT_CODES}",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="a train_sft.py export, a local Hugging Face model directory (model + tokenizer), or a hub name",
    )
    p.add_argument(
        "--base-model", default=None, help="a LoRA export's base model (local directory or hub name); default: its own"
    )
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa", help="the model's attention")
    p.add_argument(
        "--data",
        default=None,
        help=f"a local JSONL file of {bench.prompt_field}/{bench.answer_field} records (instead of --hf-name)",
    )
    p.add_argument(
        "--hf-name",
        default=bench.hf_name,
        help="a Hugging Face dataset, downloaded or from the local cache",
    )
    p.add_argument("--hf-config", default=bench.hf_config, help="its config name")
    p.add_argument("--split", default="test", help="its split")
    p.add_argument("--max-new-tokens", type=int, default=bench.max_new_tokens, help="the longest answer generated")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--draft-tokens", type=int, default=1, help="k > 1: the export's registers draft k - 1 tokens")
    p.add_argument(
        "--scoring", choices=sorted(bench.scorers), default=bench.default_scoring, help="the accuracy reported as such"
    )
    p.add_argument("--prompt-template", default=None, help=f"default: the export's, else {bench.template!r}")
    p.add_argument("--limit", type=int, default=None, help="the first N problems only")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when available")
    p.add_argument("--out", type=Path, required=True, help="the results JSON written")
    return p


def run_benchmark(bench: Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    """Data, model (and drafting registers), generation and scoring for one benchmark."""
    records, located = gather(  # every missing input named at once, before any model is loaded
        lambda: read_records(
            args.data, None if args.data else args.hf_name, args.hf_config, args.split, ("--data", "--hf-name")
        ),
        lambda: locate_checkpoint(args.ckpt, args.base_model),
    )
    records = records[: args.limit] if args.limit else records
    model, tokenizer, info = load_for_generation(
        args.ckpt, args.base_model, args.attn_implementation, args.device, located
    )
    registers = drafting_registers(args.ckpt, info, model, args.draft_tokens)
    return evaluate_answers(
        model, tokenizer, records, args.prompt_template or info.get("prompt_template", bench.template),
        bench.prompt_field, bench.answer_field, bench.scorers, args.scoring, info.get("prompt_attention", "causal"),
        args.max_new_tokens, args.batch_size, args.out, extra={"checkpoint": str(args.ckpt), "benchmark": bench.name},
        registers=registers, draft_tokens=args.draft_tokens,
    )  # fmt: skip
