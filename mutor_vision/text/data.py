"""Prompt/answer examples: templates, tokenisation, over-long filtering, right-padded batches."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mutor_vision.errors import InputError
from mutor_vision.text.hub import load_hub_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # BOS (when the tokenizer has one) + templated prompt
    answer_ids: list[int]  # templated answer + EOS
    reference: str  # the raw answer text (for evaluation)
    prompt_text: str


def read_records(
    jsonl: str | None,
    hf_name: str | None,
    hf_config: str | None,
    split: str,
    keys: tuple[str, str] = ("data.jsonl", "data.hf_name"),
) -> list[dict]:
    """Rows from a local JSONL file or a Hugging Face dataset (``datasets``, in the ``[text]`` extra).

    ``keys`` name the two sources in messages (the config keys, or a command's flags). A hub dataset
    that cannot be had (offline, not cached) stops within seconds naming both (``hub.load_hub_dataset``).
    """
    local_key, hub_key = keys
    if jsonl:
        path = Path(jsonl).expanduser()
        if not path.is_file():
            raise InputError(f"{local_key} {jsonl!r}: no such file (a JSONL file of prompt/answer records)")
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON line ({error})") from None
        return rows
    if hf_name:
        return load_hub_dataset(hf_name, hf_config, split, hub_key, local_key)
    raise InputError(f"set {local_key} (a local JSONL file) or {hub_key} (a Hugging Face dataset)")


def build_examples(
    records: list[dict],
    tokenizer,
    prompt_field: str,
    answer_field: str,
    prompt_template: str,
    answer_template: str,
    max_length: int,
) -> tuple[list[Example], int]:
    """Tokenised examples and how many were dropped: longer than ``max_length`` (never truncated), or
    with an empty prompt or answer (nothing to learn). Each kind of drop is counted in a warning."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: answers must end with one")
    examples, too_long, empty = [], 0, 0
    for index, record in enumerate(records):
        try:
            prompt, answer = record[prompt_field], record[answer_field]
        except KeyError as error:
            raise InputError(f"data record {index}: missing field {error} (have {sorted(record)})") from None
        except TypeError:
            raise InputError(
                f"data record {index}: expected a mapping of fields, got {type(record).__name__}"
            ) from None
        if not str(prompt).strip() or not str(answer).strip():
            empty += 1
            continue
        prompt_text = prompt_template.format(prompt=prompt)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer_template.format(answer=answer), add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        if len(prompt_ids) + len(answer_ids) > max_length:
            too_long += 1
            continue
        examples.append(Example(prompt_ids, answer_ids, str(answer), prompt_text))
    if too_long:
        log.warning("dropped %d of %d examples longer than max_length %d", too_long, len(records), max_length)
    if empty:
        log.warning("dropped %d of %d examples with an empty prompt or answer", empty, len(records))
    return examples, too_long + empty


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


def word_tokenizer(texts: list[str], split_punctuation: bool = True):
    """A word-level Hugging Face tokenizer trained on ``texts``: ``<bos>`` prepended, ``<eos>``, ``<pad>``
    (id 0) and ``<unk>``. For tests, benchmarks and toy tasks: no download."""
    # lazy: the Hugging Face libraries are the optional `text` extra, and slow to import
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"]))
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", core.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
