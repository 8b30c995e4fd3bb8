"""The text adapter config: model, data, method, LoRA, optimiser, loop (YAML, typed, validated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mutor_vision.config import check
from mutor_vision.training.loop_config import LoopConfig, OptimConfig

GSM8K_PROMPT = "Question: {prompt}\n\nAnswer:"  # the MuToR authors' template
GSM8K_ANSWER = " {answer}"


@dataclass
class TextModelConfig:
    name_or_path: str = ""  # a local model directory (works offline) or a hub name (downloaded, or the local cache)
    tokenizer: str | None = None  # a local tokenizer directory or a hub name; null: the one of name_or_path
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"  # the register mask comes in its form
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # CPU always loads float32

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "name_or_path", "must be set (a local model directory or a hub name)")


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
class MethodConfig:
    name: Literal["ntp", "mutor"] = "mutor"  # ntp: plain next-token fine-tuning, no registers
    d_max: int = 4  # d uniform in {1..d_max} per sample
    weight: float = 0.3  # a in (1 - a)·L_ntp + a·L_reg
    register_fraction: float | None = None  # sparse registers: this fraction of answer slots; null = all
    prompt_attention: Literal["causal", "bidirectional"] = "bidirectional"  # the paper's setting (causal: any stack)
    loss_normalization: Literal["sample", "token"] = "sample"  # sample: mean of per-sample means (the authors')

    def __post_init__(self) -> None:
        check(self.d_max >= 1, "d_max", "must be >= 1")
        check(0.0 <= self.weight <= 1.0, "weight", "must be in [0, 1]")
        frac = self.register_fraction
        check(frac is None or 0.0 < frac <= 1.0, "register_fraction", "must be in (0, 1] or null")


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
    """Text fine-tuning: the causal LM, its data, the method, LoRA, and the loop keys (some defaults differ)."""

    model: TextModelConfig = field(default_factory=TextModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
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
