"""Prompt/answer examples: templates, tokenisation, over-long filtering, right-padded batches."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mutor_vision.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # BOS (when the tokenizer has one) + templated prompt
    answer_ids: list[int]  # templated answer + EOS
    reference: str  # the raw answer text (for evaluation)
    prompt_text: str


def read_records(jsonl: str | None, hf_name: str | None, hf_config: str | None, split: str) -> list[dict]:
    """Rows from a local JSONL file or a Hugging Face dataset (``datasets``, in the ``[text]`` extra)."""
    if jsonl:
        path = Path(jsonl)
        if not path.is_file():
            raise InputError(f"data.jsonl: {path}: no such file")
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON line ({error})") from None
        return rows
    if hf_name:
        try:
            import datasets
        except ImportError:
            raise ImportError("data.hf_name needs the `datasets` package: pip install -e \".[text]\"") from None
        return list(datasets.load_dataset(hf_name, hf_config, split=split))
    raise ValueError("data: set jsonl (a local file) or hf_name (a Hugging Face dataset)")


def build_examples(
    records: list[dict],
    tokenizer,
    prompt_field: str,
    answer_field: str,
    prompt_template: str,
    answer_template: str,
    max_length: int,
) -> tuple[list[Example], int]:
    """Tokenised examples and the number dropped for exceeding ``max_length`` (counted, never truncated)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: answers must end with one")
    examples, dropped = [], 0
    for index, record in enumerate(records):
        try:
            prompt_text = prompt_template.format(prompt=record[prompt_field])
            answer_text = answer_template.format(answer=record[answer_field])
        except KeyError as error:
            raise InputError(f"data record {index}: missing field {error} (have {sorted(record)})") from None
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(answer_ids) > max_length:
            dropped += 1
            continue
        examples.append(Example(prompt_ids, answer_ids, str(record[answer_field]), prompt_text))
    if dropped:
        log.warning("dropped %d of %d examples longer than max_length %d", dropped, len(records), max_length)
    return examples, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` (B, L), ``prompt_len`` (B,), ``answer_len`` (B,)."""
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in examples]
    input_ids = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : lengths[row]] = torch.tensor(e.prompt_ids + e.answer_ids)
    return {
        "input_ids": input_ids,
        "prompt_len": torch.tensor([len(e.prompt_ids) for e in examples]),
        "answer_len": torch.tensor([len(e.answer_ids) for e in examples]),
    }
