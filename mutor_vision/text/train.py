"""Fine-tune a Hugging Face causal LM with MuToR-1D (or next-token), on CPU, one GPU or DDP.

Shares the image trainer's runtime (accelerator, checkpoints, stop signals, resume). Data order is
a pure function of (seed, step): epoch e is a permutation seeded by (seed, e), step s takes the
s-th slice of it (the last partial batch of an epoch is dropped), so resuming is exact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mutor_vision.config import to_dict
from mutor_vision.errors import InputError
from mutor_vision.files import atomic_write_text
from mutor_vision.seeds import hash_seed
from mutor_vision.text.adapter import MuToRAdapter
from mutor_vision.text.config import TextModelConfig, TextTrainConfig
from mutor_vision.text.data import Example, build_examples, collate, read_records
from mutor_vision.training.checkpoints import CheckpointManager
from mutor_vision.training.optim import build_scheduler
from mutor_vision.training.runtime import (
    StopFlag,
    TrainResult,
    any_rank,
    backward_and_step,
    flat_hparams,
    make_accelerator,
    restore,
    resume_candidates,
)

log = logging.getLogger(__name__)
ADAPTER_FILE = "mutor_text.json"


def load_tokenizer(config: TextModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.name_or_path)


def load_model(config: TextModelConfig, device: torch.device):
    """The causal LM with the configured attention implementation, from a path or the hub."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" and config.dtype == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(
        config.name_or_path, dtype=dtype, attn_implementation=config.attn_implementation
    )


def build_adapter(model, config: TextTrainConfig) -> MuToRAdapter:
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

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
    m = config.method
    return MuToRAdapter(model, m.name, m.d_max, m.weight, m.register_fraction, m.prompt_attention)


def step_examples(examples: list[Example], step: int, global_batch: int, seed: int) -> list[Example]:
    """The examples of optimizer step ``step``: a pure function of (seed, step)."""
    steps_per_epoch = len(examples) // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = np.random.default_rng(hash_seed(seed, epoch)).permutation(len(examples))
    return [examples[i] for i in order[within * global_batch : (within + 1) * global_batch]]


def train_text(
    config: TextTrainConfig, resume: str | None = None, allow_change: Sequence[str] = (), model=None, tokenizer=None
) -> TrainResult:
    """Train per ``config`` (``model``/``tokenizer`` may be given directly, e.g. in tests).

    The data file is read and the resume checked before the model is loaded or anything is written.
    """
    out_dir = Path(config.out_dir)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_last)
    d = config.data
    records = read_records(d.jsonl, d.hf_name, d.hf_config, d.split)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model)
    examples, dropped = build_examples(
        records, tokenizer, d.prompt_field, d.answer_field, d.prompt_template, d.answer_template, d.max_length
    )
    if len(examples) < config.global_batch_size:
        raise InputError(
            f"{d.jsonl or d.hf_name}: {len(examples)} usable examples, fewer than one global batch "
            f"({config.global_batch_size})"
        )
    steps_per_epoch = len(examples) // config.global_batch_size
    total_steps = config.epochs * steps_per_epoch
    recorded_config = to_dict(config)
    candidates = resume_candidates(manager, resume, recorded_config, allow_change, total_steps)
    trackers = (["tensorboard"] if config.tensorboard else []) + (["wandb"] if config.wandb else [])
    accelerator, accumulation = make_accelerator(
        config.mixed_precision, config.global_batch_size, config.micro_batch_size, out_dir, trackers, config.device
    )
    if model is None:
        model = load_model(config.model, accelerator.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("%d examples (%d dropped as too long), %d steps", len(examples), dropped, total_steps)

    torch.manual_seed(config.seed)
    adapter = build_adapter(model, config)
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay
    )
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    trainable = [p for p in adapter.parameters() if p.requires_grad]  # the prepared ones (FSDP replaces them)
    accelerator.register_for_checkpointing(scheduler)
    core: MuToRAdapter = accelerator.unwrap_model(adapter)
    step = restore(accelerator, manager, candidates, recorded_config, allow_change, total_steps)
    if accelerator.is_main_process:  # only now: nothing is written before every check passed
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(recorded_config, sort_keys=False))
    if trackers:
        accelerator.init_trackers("text", config=flat_hparams(recorded_config))

    def export(directory: Path) -> None:
        if accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            core.model.save_pretrained(directory / "model")  # a peft model saves only its adapter
            tokenizer.save_pretrained(directory / "model")
            save_file(
                {"vector": core.registers.vector.detach().cpu().contiguous()}, directory / "registers.safetensors"
            )
            info = {
                "base_model": config.model.name_or_path,
                "lora": config.lora.enabled,
                "attn_implementation": config.model.attn_implementation,
                "prompt_template": config.data.prompt_template,
                **to_dict(config.method),
            }
            (directory / ADAPTER_FILE).write_text(json.dumps(info, indent=2))

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    result = TrainResult(step=step, reason="completed")
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, unit="step")
    adapter.train()
    grad_norm = float("nan")
    with StopFlag() as stop:
        while step < total_steps:
            torch.manual_seed(hash_seed(config.seed, rank, step))  # dropout (LoRA, model)
            layouts = torch.Generator().manual_seed(hash_seed(config.seed, rank, step, 1))
            chosen = step_examples(examples, step, config.global_batch_size, config.seed)
            mine = chosen[rank * config.micro_batch_size * accumulation :][: config.micro_batch_size * accumulation]
            losses = []
            for k in range(accumulation):
                batch = collate(mine[k * config.micro_batch_size : (k + 1) * config.micro_batch_size], pad_id)
                batch = {name: t.to(device) for name, t in batch.items()}
                with accelerator.accumulate(adapter), accelerator.autocast():
                    output = adapter(**batch, generator=layouts)
                    parts = core.loss(batch["input_ids"], batch["prompt_len"], batch["answer_len"], output)
                    values, norm = backward_and_step(
                        accelerator, optimizer, parts, trainable, config.optim.grad_clip, step, manager.latest
                    )
                grad_norm = norm if norm is not None else grad_norm
                losses.append(values)
            scheduler.step()
            step += 1
            mean = [sum(x) / len(losses) for x in zip(*losses, strict=True)]
            result.losses.append(mean[0])
            progress.update(1)
            if step % config.log_every == 0 or step == total_steps:
                metrics = {"train/loss": mean[0], "train/loss_ntp": mean[1], "train/loss_reg": mean[2]}
                metrics |= {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm}
                accelerator.log(metrics, step=step)
                progress.set_postfix(loss=f"{mean[0]:.4f}")
            stopping = any_rank(accelerator, stop.requested)
            if step % config.save_every == 0 or step == total_steps or stopping:
                state = {"reason": "terminated" if stopping else "periodic", "world_size": world}
                result.checkpoint = manager.save(accelerator, step, {**state, "config": to_dict(config)}, export)
            if stopping:
                result.reason = "terminated"
                break
    progress.close()
    result.step = step
    accelerator.end_training()
    return result
