"""The text task: fine-tune a Hugging Face causal LM with MuToR-1D (or next-token) through the one loop.

Data order is a pure function of (seed, step): epoch e is a permutation seeded by (seed, e), step s
takes the s-th slice of it (the last partial batch of an epoch is dropped), so resuming is exact, costs
no replay, and ``save_every`` changes nothing trained. On another number of ranks a step holds the same
examples, split otherwise across the ranks (whose draws are seeded by rank).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mutor_vision.errors import InputError
from mutor_vision.processes import use_cuda
from mutor_vision.seeds import hash_seed
from mutor_vision.text.adapter import MuToRAdapter
from mutor_vision.text.config import TextModelConfig, TextTrainConfig
from mutor_vision.text.data import Example, build_examples, collate, read_records
from mutor_vision.text.export import registers_info, write_text_export
from mutor_vision.text.hub import ModelSource, from_pretrained, gather, locate_model
from mutor_vision.training import loop
from mutor_vision.training.runtime import TrainResult

log = logging.getLogger(__name__)


def model_source(config: TextModelConfig) -> ModelSource:
    """Where the model comes from (a local directory or a usable hub name), decided in seconds."""
    return locate_model(config.name_or_path, "model.name_or_path")


def tokenizer_source(config: TextModelConfig) -> ModelSource:
    """Where the tokenizer comes from: ``model.tokenizer``, else the model's directory or hub name."""
    if config.tokenizer:
        return locate_model(config.tokenizer, "model.tokenizer", "tokenizer")
    return model_source(config)


def load_tokenizer(config: TextModelConfig, source: ModelSource | None = None):
    from transformers import AutoTokenizer  # lazy: Hugging Face libraries (the `text` extra) load only where used

    return from_pretrained(AutoTokenizer, source or tokenizer_source(config))


def load_model(config: TextModelConfig, on_cuda: bool, source: ModelSource | None = None):
    """The causal LM with the configured attention implementation, from a path or the hub."""
    # lazy: Hugging Face libraries (the `text` extra) load only where used
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if on_cuda and config.dtype == "bfloat16" else torch.float32
    return from_pretrained(
        AutoModelForCausalLM,
        source or model_source(config),
        dtype=dtype,
        attn_implementation=config.attn_implementation,
    )


def build_adapter(model, config: TextTrainConfig) -> MuToRAdapter:
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model  # lazy: peft is a slow import; only LoRA needs it

        lora = config.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return MuToRAdapter(model, config.registers, head_chunk_size=config.model.head_chunk_size)


def step_examples(examples: list[Example], step: int, global_batch: int, seed: int) -> list[Example]:
    """The examples of optimizer step ``step``: a pure function of (seed, step)."""
    steps_per_epoch = len(examples) // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = np.random.default_rng(hash_seed(seed, epoch)).permutation(len(examples))
    return [examples[i] for i in order[within * global_batch : (within + 1) * global_batch]]


class TextTask:
    """Prompt/answer rows -> the combined MuToR-1D loss of a Hugging Face causal LM (or plain next-token)."""

    name = "text"
    flops_per_sample = None  # varies with each row's length; the throughput log counts tokens

    def __init__(self, config: TextTrainConfig, model=None, tokenizer=None) -> None:
        """Reads and tokenises the data first: a bad data file stops before any model is loaded. The
        data, the model and the tokenizer are all located first, and every one missing is named at once
        (a new user offline learns each key to set from one line)."""
        self.config, self.model = config, model
        d = config.data
        records, self.model_source, tokenizer_from = gather(
            lambda: read_records(d.jsonl, d.hf_name, d.hf_config, d.split),
            lambda: model_source(config.model) if model is None else None,
            lambda: tokenizer_source(config.model) if tokenizer is None and config.model.tokenizer else None,
        )
        if tokenizer is None:
            tokenizer = load_tokenizer(config.model, tokenizer_from or self.model_source)
        self.tokenizer = tokenizer
        self.examples, dropped = build_examples(
            records, self.tokenizer, d.prompt_field, d.answer_field, d.prompt_template, d.answer_template, d.max_length
        )
        if len(self.examples) < config.global_batch_size:
            raise InputError(
                f"{d.jsonl or d.hf_name}: {len(self.examples)} usable examples, fewer than one global batch "
                f"({config.global_batch_size})"
            )
        self.total_steps = config.epochs * (len(self.examples) // config.global_batch_size)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.dropped = dropped
        self.warnings: list[str] = []
        log.info("%d examples (%d dropped as too long), %d steps", len(self.examples), dropped, self.total_steps)

    def summary(self) -> dict[str, str]:
        """The data and model lines of the start-up summary."""
        d, model, registers = self.config.data, self.config.model, self.config.registers
        data = (
            f"{d.jsonl or d.hf_name}: {len(self.examples):,} examples "
            f"({self.dropped:,} dropped as longer than max_length {d.max_length})"
        )
        mode = registers.mode if registers.enabled else "none (next-token)"
        lora = ", LoRA" if self.config.lora.enabled else ""
        name = self.model_source.name if self.model_source is not None else model.name_or_path
        return {"data": data, "model": f"{name}{lora}, registers {mode}"}

    def build_model(self, fresh: bool) -> MuToRAdapter:
        model = self.model
        if model is None:
            model = load_model(self.config.model, use_cuda(self.config.device), self.model_source)
        return build_adapter(model, self.config)

    def micro_batches(self, step: int, accumulation: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
        micro = self.config.micro_batch_size
        chosen = step_examples(self.examples, step, self.config.global_batch_size, self.config.seed)
        mine = chosen[rank * micro * accumulation :][: micro * accumulation]
        for k in range(accumulation):
            yield collate(mine[k * micro : (k + 1) * micro], self.pad_id)

    def inputs(self, model: MuToRAdapter, batch: dict, generator: torch.Generator) -> dict:
        # The layout is drawn outside the forward, as for images: a compiled forward sees only tensors.
        layout = model.layout(batch["prompt_len"], batch["answer_len"], batch["input_ids"].shape[1], generator)
        return {**batch, "layout": layout, "return_loss": True}

    def count(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return batch["input_ids"].shape[0], int((batch["prompt_len"] + batch["answer_len"]).sum())

    def export(self, directory: Path, weights: dict[str, torch.Tensor], unwrapped: MuToRAdapter, step: int) -> None:
        model_state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
        info = {
            "base_model": self.config.model.name_or_path,
            "lora": self.config.lora.enabled,
            "attn_implementation": self.config.model.attn_implementation,
            "prompt_template": self.config.data.prompt_template,
            **registers_info(self.config.registers),
        }
        write_text_export(directory, unwrapped.model, self.tokenizer, weights["registers.vector"], info, model_state)


def train_text(
    config: TextTrainConfig,
    resume: str | None = None,
    allow_change: Sequence[str] = (),
    model=None,
    tokenizer=None,
    force: bool = False,
) -> TrainResult:
    """Train per ``config`` (``model``/``tokenizer`` may be given directly, e.g. in tests).

    The data file is read and the resume checked before the model is loaded or anything is written.
    ``force``: take ``out_dir`` over from another run holding it (``mutor_vision/locks.py``).
    """
    return loop.run(TextTask(config, model, tokenizer), config, resume, allow_change, force=force)
