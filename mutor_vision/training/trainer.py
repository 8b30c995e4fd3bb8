"""The class-conditional training loop: one trainer for next-token, MuToR-1D and MuToR-2D, DDP or FSDP.

Exact resume: every random draw of step s (dropout, class dropout, register layout) is seeded
from (seed, rank, s), and the data stream is re-seeded from (seed, rank, s) at every checkpoint
step, so N steps + resume + N steps equals 2N uninterrupted steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from mutor_vision.config import to_dict
from mutor_vision.data import token_loader
from mutor_vision.errors import ConfigError
from mutor_vision.files import atomic_write_json, atomic_write_text
from mutor_vision.models import GPT, GPTConfig
from mutor_vision.models.checkpoint import load_state_dict_strict, read_state_dict, save_gpt_weights
from mutor_vision.seeds import hash_seed
from mutor_vision.shards import check_manifest, read_manifest
from mutor_vision.training.checkpoints import CheckpointManager
from mutor_vision.training.config import TrainConfig
from mutor_vision.training.optim import build_optimizer, build_scheduler
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


def train(config: TrainConfig, resume: str | None = None, allow_change: Sequence[str] = ()) -> TrainResult:
    """Train per ``config``; ``resume`` is None, ``"auto"`` (newest complete checkpoint) or a path.

    ``allow_change`` names config keys that may differ from the resumed checkpoint's. Every input is
    checked before anything is built or written: a wrong resume, config or dataset changes nothing.
    """
    out_dir = Path(config.out_dir)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_last)
    recorded_config = to_dict(config)
    candidates = resume_candidates(manager, resume, recorded_config, allow_change, config.steps)
    if not config.data.root:
        raise ConfigError("data.root: must be set (a folder of token shards with manifest.json)")
    manifest = read_manifest(config.data.root)
    check_manifest(manifest, **_data_expectations(config.model))
    trackers = (["tensorboard"] if config.tensorboard else []) + (["wandb"] if config.wandb else [])
    accelerator, accumulation = make_accelerator(
        config.mixed_precision, config.global_batch_size, config.micro_batch_size, out_dir, trackers, config.device
    )

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = GPT(config.model)
    if config.init_from and not candidates:
        load_state_dict_strict(
            model, read_state_dict(config.init_from, trust=config.trust_checkpoint), config.init_from
        )
        log.info("initialised from %s", config.init_from)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    if config.ema.enabled and getattr(accelerator.state, "fsdp_plugin", None) is not None:
        # The EMA copy is a full replica updated from the live weights; under FSDP those are
        # shards (DTensors), which timm's EMA does not gather. Refuse rather than fail mid-run.
        raise ConfigError("ema.enabled: not supported with FSDP yet; use DDP or disable EMA")
    model, optimizer = accelerator.prepare(model, optimizer)  # one call: FSDP2 needs both together
    core: GPT = accelerator.unwrap_model(model)
    ema = None
    if config.ema.enabled:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(core, decay=config.ema.decay)  # after prepare: a copy on the training device
    accelerator.register_for_checkpointing(scheduler)  # stepped by us, never prepared (ecosystem.md §3)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    forward = model
    if config.compile and accelerator.device.type == "cuda":
        forward = torch.compile(model)
    elif config.compile:
        log.info("compile: true is ignored on CPU (compiling costs more than it saves on CPU runs)")
    params = list(model.parameters())  # the prepared ones

    step = restore(accelerator, manager, candidates, recorded_config, allow_change, config.steps)
    if accelerator.is_main_process:  # only now: nothing is written before every check passed
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(recorded_config, sort_keys=False))
    if trackers:
        accelerator.init_trackers("c2i", config=flat_hparams(recorded_config))

    def export(directory: Path) -> None:
        weights = accelerator.get_state_dict(model)  # every rank: FSDP gathers the full state
        if accelerator.is_main_process:
            save_gpt_weights(weights, core.config, directory)
            # The tokenizer the shards were made with, so eval/fid.py can decode without flags.
            atomic_write_json(directory / "tokenizer.json", manifest.raw.get("tokenizer", {}))
            if ema is not None:
                save_gpt_weights(ema.module.state_dict(), core.config, directory.parent / "export_ema")

    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    num_tokens = core.config.num_tokens
    registers = core.config.registers
    register_count = (registers.num_registers or num_tokens) if registers.enabled else 0
    flops_per_image = core.config.train_flops_per_sample(num_tokens + register_count)
    result = TrainResult(step=step, reason="completed")
    progress = tqdm(total=config.steps, initial=step, disable=not accelerator.is_main_process, unit="step")
    window = {"loss": 0.0, "ntp": 0.0, "reg": 0.0, "steps": 0, "start": time.perf_counter()}
    grad_norm = float("nan")

    with StopFlag() as stop:
        while step < config.steps:
            # The stream of a segment (save_every steps) is seeded by its first step; resuming inside a
            # segment replays its start and skips what was consumed, so the data match exactly.
            segment_start = step - step % config.save_every
            segment_end = min(config.steps, segment_start + config.save_every)
            batches = iter(
                token_loader(
                    config.data.root,
                    batch_size=config.micro_batch_size,
                    num_batches=(segment_end - segment_start) * accumulation,
                    seed=hash_seed(config.seed, segment_start),
                    rank=rank,
                    world_size=world,
                    num_workers=config.data.num_workers,
                    shuffle_buffer=config.data.shuffle_buffer,
                    on_error=config.data.on_error,
                    expect=_data_expectations(core.config),
                )
            )
            for _ in range((step - segment_start) * accumulation):
                next(batches)
            while step < segment_end:
                torch.manual_seed(hash_seed(config.seed, rank, step))  # dropout, class dropout
                layouts = torch.Generator().manual_seed(hash_seed(config.seed, rank, step, 1))
                losses = []
                for _ in range(accumulation):
                    tokens, labels = send_to_device(next(batches), device)
                    with accelerator.accumulate(model):
                        layout = core.register_layout(tokens.shape[0], generator=layouts, device=device)
                        # The mask is built outside the (optionally compiled) forward: BlockMask
                        # creation does not trace, and a fresh layout then never recompiles.
                        mask = None if layout is None else core.attention_mask(layout)
                        with accelerator.autocast():
                            output = forward(tokens, labels, layout, mask)
                        parts = core.loss(tokens, output, layout)
                        values, norm = backward_and_step(
                            accelerator, optimizer, parts, params, config.optim.grad_clip, step, manager.latest
                        )
                    grad_norm = norm if norm is not None else grad_norm
                    losses.append(values)
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(core, step=step)
                mean = [sum(x) / len(losses) for x in zip(*losses, strict=True)]
                result.losses.append(mean[0])
                window["loss"] += mean[0]
                window["ntp"] += mean[1]
                window["reg"] += mean[2]
                window["steps"] += 1
                progress.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    _log_window(accelerator, window, step, scheduler, grad_norm, config, num_tokens, flops_per_image)
                    progress.set_postfix(loss=f"{mean[0]:.4f}")
                stopping = any_rank(accelerator, stop.requested)
                if step == segment_end or stopping:
                    state = {
                        "reason": "terminated" if stopping else "periodic",
                        "world_size": world,
                        "accumulation": accumulation,
                        "config": to_dict(config),
                    }
                    result.checkpoint = manager.save(accelerator, step, state, export)
                if stopping:
                    result.reason = "terminated"
                    break
            if result.reason == "terminated":
                break
    progress.close()
    result.step = step
    accelerator.end_training()
    return result


def _data_expectations(model: GPTConfig) -> dict[str, int]:
    return dict(grid_size=model.grid_size, vocab_size=model.vocab_size, num_classes=model.num_classes)


def _log_window(
    accelerator, window: dict, step: int, scheduler, grad_norm: float, config, num_tokens: int, flops_per_image: float
) -> None:
    elapsed = time.perf_counter() - window["start"]
    steps = max(window["steps"], 1)
    means = torch.tensor([window["loss"], window["ntp"], window["reg"]], device=accelerator.device) / steps
    means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
    images_per_s = config.global_batch_size * steps / elapsed
    metrics = {
        "train/loss": means[0].item(),
        "train/loss_ntp": means[1].item(),
        "train/loss_reg": means[2].item(),
        "train/lr": scheduler.get_last_lr()[0],
        "train/grad_norm": grad_norm,
        "perf/images_per_s": images_per_s,
        "perf/tokens_per_s": images_per_s * num_tokens,
        "perf/step_s": elapsed / steps,
    }
    if accelerator.device.type == "cuda":
        metrics["perf/mfu"] = images_per_s * flops_per_image / (config.peak_tflops * 1e12 * accelerator.num_processes)
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        log.info("step %d: %s", step, " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()))
    window.update(loss=0.0, ntp=0.0, reg=0.0, steps=0, start=time.perf_counter())
