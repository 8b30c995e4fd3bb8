"""The text adapter config: model, data, registers, LoRA, optimiser, loop (YAML, typed, validated).

The ``registers:`` keys are the image model's (``mutor_vision/core/config.py``) with the text
defaults. Configs and checkpoints of older versions name that section ``method:`` (with
``name: ntp | mutor``): they load as ``registers:`` with one deprecation line (:data:`METHOD_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mutor_vision.config import check
from mutor_vision.core.config import TextRegisterConfig
from mutor_vision.errors import ConfigError
from mutor_vision.training.loop_config import LoopConfig, OptimConfig

GSM8K_PROMPT = "Question: {prompt}\n\nAnswer:"  # the MuToR authors' template
GSM8K_ANSWER = " {answer}"


@dataclass
class TextModelConfig:
    name_or_path: str = ""  # a local model directory (works offline) or a hub name (downloaded, or the local cache)
    tokenizer: str | None = None  # a local tokenizer directory or a hub name; null: the one of name_or_path
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"  # the register mask comes in its form
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # CPU always loads float32
    head_chunk_size: int = 0  # training loss: head + CE this many positions at a time (plain linear heads); 0: whole

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "name_or_path", "must be set (a local model directory or a hub name)")
        check(self.head_chunk_size >= 0, "head_chunk_size", f"must be >= 0, got {self.head_chunk_size}")


@dataclass
class TextDataConfig:
    jsonl: str | None = None  # a local JSON-lines file with the two fields below (works offline)
    hf_name: str | None = None  # or a Hugging Face dataset (e.g. gsm8k, config main; downloaded, or the local cache)
    hf_config: str | None = None  # the dataset config name (gsm8k: main)
    split: str = "train"  # the dataset split (hf_name)
    prompt_field: str = "question"  # the record field with the prompt
    answer_field: str = "answer"  # the record field with the answer
    prompt_template: str = GSM8K_PROMPT  # {prompt} is the prompt field
    answer_template: str = GSM8K_ANSWER  # {answer} is the answer field; EOS is appended
    max_length: int = 512  # longer examples are dropped and counted, never truncated

    def __post_init__(self) -> None:
        check(bool(self.jsonl) != bool(self.hf_name), "jsonl", "set exactly one of data.jsonl and data.hf_name")
        check(self.max_length >= 2, "max_length", "must be >= 2")
        check("{prompt}" in self.prompt_template, "prompt_template", "must contain {prompt}")
        check("{answer}" in self.answer_template, "answer_template", "must contain {answer}")


@dataclass
class LoraSettings:
    enabled: bool = False  # false: full fine-tuning (the paper)
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = field(  # the Linear layers that get an adapter
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", "must be >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass
class TextTrainConfig(LoopConfig):
    """Text fine-tuning: the causal LM, its data, the registers, LoRA, and the loop keys (some defaults differ)."""

    model: TextModelConfig = field(default_factory=TextModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    registers: TextRegisterConfig = field(default_factory=TextRegisterConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 5  # passes over the data; steps = epochs × (examples // global_batch_size)
    optim: OptimConfig = field(  # the MuToR authors' text recipe
        default_factory=lambda: OptimConfig(
            lr=5e-5, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.0, schedule="warmup_linear", warmup_ratio=0.1
        )
    )
    global_batch_size: int = 10  # examples per optimizer step over all ranks (paper: effective batch 10)
    micro_batch_size: int = 10
    out_dir: str = "runs/text"
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(
            self.registers.modality == "text",
            "registers",
            f"a {type(self.registers).__name__} has the {self.registers.modality} defaults; text takes a "
            "TextRegisterConfig",
        )

    @classmethod
    def upgrade_keys(cls, data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """An older config's ``method:`` section read as ``registers:`` (``mutor_vision.config`` calls this)."""
        if "method" not in data:
            return data, None
        data = dict(data)
        mapped = method_as_registers(data.pop("method"))
        given = data.get("registers")
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ConfigError(f"registers: expected a mapping, got {type(given).__name__}")
        old_name = {new: old for old, new in METHOD_KEYS.items()}
        for key, value in mapped.items():
            if key in given and given[key] != value:
                raise ConfigError(
                    f"method.{old_name[key]} ({value!r} as registers.{key}) and registers.{key} ({given[key]!r}) "
                    "disagree: method: is the old name of registers:, keep registers: only"
                )
        data["registers"] = {**mapped, **given}
        mode = data["registers"].get("mode", "mutor1d")
        renamed = f"method.name {METHOD_OLD_NAMES.get(mode, mode)} is registers.mode {mode}"
        return data, f"method: is the old name of registers: ({renamed}, other keys unchanged); rename the section"


# The old text section ``method:`` -> ``registers:``: its keys (only ``name`` was renamed) and name values.
METHOD_KEYS = {
    "name": "mode",
    "d_max": "d_max",
    "weight": "weight",
    "register_fraction": "register_fraction",
    "prompt_attention": "prompt_attention",
    "loss_normalization": "loss_normalization",
}
METHOD_NAMES = {"ntp": "ntp", "mutor": "mutor1d"}
METHOD_OLD_NAMES = {new: old for old, new in METHOD_NAMES.items()}


def method_as_registers(method: Any) -> dict[str, Any]:
    """An old ``method:`` section as ``registers:`` keys (``name: mutor`` -> ``mode: mutor1d``)."""
    method = {} if method is None else method
    if not isinstance(method, dict):
        raise ConfigError(f"method: expected a mapping, got {type(method).__name__}")
    unknown = sorted(set(method) - set(METHOD_KEYS))
    if unknown:
        where = ", ".join(f"method.{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {where} (method: is the old name of registers:, see docs/text.md)")
    name = method.get("name", "mutor")
    if name not in METHOD_NAMES:
        raise ConfigError(f"method.name: must be one of {list(METHOD_NAMES)}, got {name!r}")
    mapped = {METHOD_KEYS[k]: v for k, v in method.items()}
    if "name" in method:
        mapped["mode"] = METHOD_NAMES[name]
    return mapped
