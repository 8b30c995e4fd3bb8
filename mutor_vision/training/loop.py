"""The one training loop: every task (class-conditional images, text fine-tuning) runs through it.

A task supplies the model, the micro-batches of each optimizer step, the inputs of the model's
training forward for a micro-batch (what is drawn or built outside a compiled region: register
layouts, masks), and how its weights are exported (:class:`Task`). The model's forward returns an
output whose ``loss`` holds named parts (``loss`` is backpropagated; every part is averaged and
logged by name).
The loop does the rest the same way for all:
the checks before anything is written, DDP/FSDP through accelerate, AdamW with its schedule, EMA,
gradient accumulation, clipping and the NaN stop, logging, checkpoints, SIGTERM, exact resume.

Exact resume: every random draw of step s (dropout, class dropout, register layouts) is seeded from
(seed, rank, s) here, and each task's data order is a pure function of (seed, step, rank layout),
never of ``save_every``, so N steps + resume + N steps equals 2N uninterrupted steps.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mutor_vision.config import default_values, to_dict
from mutor_vision.errors import ConfigError
from mutor_vision.files import atomic_write_text
from mutor_vision.parallelize import compile_training_forward
from mutor_vision.processes import main_process_holds, process_state
from mutor_vision.seeds import hash_seed
from mutor_vision.training.checkpoints import CheckpointManager
from mutor_vision.training.loop_config import LoopConfig
from mutor_vision.training.optim import build_optimizer, build_scheduler
from mutor_vision.training.resume import restore, resume_candidates
from mutor_vision.training.runtime import (
    StopFlag,
    TrainResult,
    any_rank,
    backward_and_step,
    batch_to_device,
    flat_hparams,
    make_accelerator,
)

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training task supplies to :func:`run`. Built before the loop starts: a task reads and
    checks its inputs in ``__init__``, so a bad dataset stops the run before anything is written."""

    name: str  # the TensorBoard project ("c2i", "text")
    total_steps: int  # optimizer steps of the whole run
    flops_per_sample: float | None  # training FLOPs per sample for MFU (None: not logged)
    warnings: list[str]  # what checking the inputs found worth a warning; logged once by the main process

    def summary(self) -> dict[str, str]:
        """Lines of the start-up summary by label (``data``, ``model``); the loop adds the run's."""

    def build_model(self, fresh: bool) -> nn.Module:
        """The model to train (unprepared; its trainable parameters are optimised). ``fresh``: no resume."""

    def micro_batches(self, step: int, accumulation: int, rank: int, world: int) -> Iterator[Any]:
        """This rank's ``accumulation`` micro-batches of optimizer step ``step`` (host tensors)."""

    def inputs(self, model: nn.Module, batch: Any, generator: torch.Generator) -> dict[str, Any]:
        """The keyword arguments of ``model``'s training forward for one micro-batch (on the device).

        ``model`` is the unwrapped module (for its layout and mask helpers); ``generator`` seeds this
        step's draws. The loop calls the prepared (maybe compiled) module with them, and the forward
        returns an output whose ``loss`` is ``{"loss": ..., other named parts}`` (scalar tensors)."""

    def count(self, batch: Any) -> tuple[int, int]:
        """(samples, tokens) in a micro-batch, for the throughput log."""

    def export(self, directory: Path, weights: dict[str, torch.Tensor], unwrapped: nn.Module, step: int) -> None:
        """Write the exported model of optimizer step ``step`` into ``directory`` (main process; ``weights``
        gathered from all ranks)."""


@dataclass
class LogWindow:
    """Sums since the last log line: the logged loss and the progress bar show the same means."""

    sums: dict[str, float] = field(default_factory=dict)  # per loss part, by the name the model gives it
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, float], samples: int, tokens: int) -> None:
        self.sums = {name: self.sums.get(name, 0.0) + value for name, value in values.items()}
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + samples, self.tokens + tokens

    def means(self) -> dict[str, float]:
        return {name: value / max(self.steps, 1) for name, value in self.sums.items()}


@dataclass
class Trainee:
    """The prepared pieces of a run: what the loop steps, checkpoints and exports."""

    model: nn.Module  # prepared by accelerate (DDP/FSDP wrapped)
    forward: Callable  # ``model``, compiled on CUDA when the config asks
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Any  # timm ModelEmaV3 or None
    params: list[nn.Parameter]  # the prepared parameters, for clipping
    num_parameters: tuple[int, int] = (0, 0)  # (all, trainable), counted before FSDP shards them


def prepare(task: Task, config: LoopConfig, accelerator, fresh: bool) -> Trainee:
    """Model, AdamW, schedule, EMA and compile, prepared by accelerate and registered for checkpoints."""
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = task.build_model(fresh=fresh)
    counts = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad))
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, task.total_steps)
    if config.ema.enabled and getattr(accelerator.state, "fsdp_plugin", None) is not None:
        # The EMA copy is a full replica updated from the live weights; under FSDP those are
        # shards (DTensors), which timm's EMA does not gather. Refuse rather than fail mid-run.
        raise ConfigError("ema.enabled: not supported with FSDP yet; use DDP or disable EMA")
    model, optimizer = accelerator.prepare(model, optimizer)  # one call: FSDP2 needs both together
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if config.ema.enabled:
        from timm.utils import ModelEmaV3  # lazy: timm is a slow import; EMA runs only

        ema = ModelEmaV3(unwrapped, decay=config.ema.decay)  # after prepare: a copy on the training device
    accelerator.register_for_checkpointing(scheduler)  # stepped here once per step, never prepared
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    forward = model
    if config.compile and accelerator.device.type == "cuda":
        forward = compile_training_forward(model)
    elif config.compile:
        log.info("compile: true is ignored on CPU (compiling costs more than it saves on CPU runs)")
    model.train()
    return Trainee(model, forward, unwrapped, optimizer, scheduler, ema, list(model.parameters()), counts)


def run(
    task: Task, config: LoopConfig, resume: str | None = None, allow_change: Sequence[str] = (), force: bool = False
) -> TrainResult:
    """Train ``task`` per ``config``; ``resume`` is None, ``"auto"`` (newest complete checkpoint) or a path.

    ``allow_change`` names config keys that may differ from the resumed checkpoint's. Nothing is
    built or written before the resume and the inputs are checked.

    ``out_dir`` is held by one run at a time (``mutor_vision/locks.py``): a second run on it stops
    with a ConfigError naming the first, before it reads or touches anything there; ``force`` takes
    the folder over from a run that holds it.
    """
    # The lock comes first: a second run's resume and clean-up would delete the first one's saves.
    state = process_state(config.device, timedelta(seconds=config.collective_timeout_s))  # the first setup: its timeout
    with main_process_holds(state, config.out_dir, "out_dir", force=force):
        return _run(task, config, resume, allow_change)


def check_trackers(config: LoopConfig) -> list[str]:
    """The trackers the config asks for; one that is not installed stops the start (accelerate would drop it
    with a debug-level line, and nothing would be logged)."""
    if config.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            'wandb: true needs the wandb package, which is not installed: pip install -e ".[wandb]" (the '
            "wandb extra), or set wandb: false"
        )
    return (["tensorboard"] if config.tensorboard else []) + (["wandb"] if config.wandb else [])


def _run(task: Task, config: LoopConfig, resume: str | None, allow_change: Sequence[str]) -> TrainResult:
    trackers = check_trackers(config)
    out_dir = Path(config.out_dir)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_last)
    recorded = to_dict(config)
    defaults = default_values(type(config))  # a checkpoint of older code lacks the keys added since
    candidates = resume_candidates(manager, resume, recorded, allow_change, task.total_steps, defaults, type(config))
    accelerator, accumulation = make_accelerator(
        config.mixed_precision, config.global_batch_size, config.micro_batch_size, out_dir, trackers, config.device
    )
    trainee = prepare(task, config, accelerator, fresh=not candidates)
    step, resumed = restore(
        accelerator, manager, candidates, recorded, allow_change, task.total_steps, defaults, type(config)
    )
    if accelerator.is_main_process:  # only now: nothing is written before every check passed
        log_startup(task, config, accelerator, accumulation, trainee, step)
        out_dir.mkdir(parents=True, exist_ok=True)
        manager.check_space(*trainee.num_parameters, ema=trainee.ema is not None)  # warns: a full disk fails a save
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(recorded, sort_keys=False))
    if trackers:
        accelerator.init_trackers(task.name, config=flat_hparams(recorded))

    def export(directory: Path, step: int) -> None:
        weights = accelerator.get_state_dict(trainee.model)  # every rank: FSDP gathers the full state
        if accelerator.is_main_process:
            task.export(directory, weights, trainee.unwrapped, step)
            if trainee.ema is not None:
                ema = trainee.ema.module.state_dict()
                task.export(directory.parent / "export_ema", ema, trainee.unwrapped, step)

    world = accelerator.num_processes
    result = TrainResult(step=step, reason="completed")
    if step >= task.total_steps:  # resumed a finished run: report the checkpoint it ended with
        result.nothing_to_do, result.checkpoint = True, resumed
    quiet = not accelerator.is_main_process or result.nothing_to_do
    progress = tqdm(total=task.total_steps, initial=step, disable=quiet, unit="step")
    window, grad_norm = LogWindow(), float("nan")
    # Log lines go above the bar (tqdm.write) instead of breaking into it; an error closes the bar
    # first, so its one line starts a line of its own.
    with StopFlag() as stop, logging_redirect_tqdm(tqdm_class=tqdm), progress:
        while step < task.total_steps:
            mean, samples, tokens, norm = optimizer_step(
                task, trainee, accelerator, config, step, accumulation, manager
            )
            step, grad_norm = step + 1, norm if norm is not None else grad_norm
            result.losses.append(mean["loss"])
            window.add(mean, samples * world, tokens * world)
            progress.update(1)
            if step % config.log_every == 0 or step == task.total_steps:
                _log(accelerator, window, step, trainee.scheduler, grad_norm, config, task.flops_per_sample, progress)
                window = LogWindow()
            stopping = any_rank(accelerator, stop.requested)
            if step % config.save_every == 0 or step == task.total_steps or stopping:
                reason = "terminated" if stopping else "periodic"
                state = {"reason": reason, "world_size": world, "accumulation": accumulation, "config": recorded}
                result.checkpoint = manager.save(accelerator, step, state, export)
            if stopping:
                result.reason = "terminated"
                break
    result.step = step
    accelerator.end_training()
    return result


def log_startup(task: Task, config: LoopConfig, accelerator, accumulation: int, trainee: Trainee, step: int) -> None:
    """What this run is about to do, before the first step: data, model, steps and batches, hardware."""
    lines = dict(task.summary())
    total, trainable = trainee.num_parameters
    params = f"{total:,} parameters ({total / 1e6:,.2f}M), {trainable:,} trainable"
    lines["model"] = f"{lines['model']}; {params}" if "model" in lines else params
    world = accelerator.num_processes
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, f"{accelerator.mixed_precision} autocast")
    compiled = "on" if trainee.forward is not trainee.model else "off (ignored on CPU)" if config.compile else "off"
    todo = "nothing left to train" if step >= task.total_steps else f"{task.total_steps - step:,} to train"
    lines["run"] = (
        f"steps {step:,} -> {task.total_steps:,} ({todo}); global batch {config.global_batch_size} = micro "
        f"{config.micro_batch_size} x {world} rank{'s' if world > 1 else ''} x {accumulation} accumulation; "
        f"device {accelerator.device}, precision {precision}, compile {compiled}"
    )
    for label, text in lines.items():
        log.info("start-up %s: %s", label, text)
    for warning in task.warnings:
        log.warning("%s", warning)


def optimizer_step(
    task: Task, trainee: Trainee, accelerator, config: LoopConfig, step: int, accumulation: int, manager
) -> tuple[dict[str, float], int, int, float | None]:
    """One optimizer step over this rank's micro-batches: (mean loss parts by name, samples, tokens, grad norm).

    The step's draws are seeded from (seed, rank, step): dropout through torch's global generator,
    register layouts through their own.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # Fetched before the step's seeds are set: loading data never consumes a training draw.
    batches = list(task.micro_batches(step, accumulation, rank, world))
    torch.manual_seed(hash_seed(config.seed, rank, step))
    generator = torch.Generator().manual_seed(hash_seed(config.seed, rank, step, 1))
    losses, samples, tokens, grad_norm = [], 0, 0, None
    for batch in batches:
        counted = task.count(batch)
        samples, tokens = samples + counted[0], tokens + counted[1]
        batch = batch_to_device(batch, accelerator.device)
        with accelerator.accumulate(trainee.model):
            inputs = task.inputs(trainee.unwrapped, batch, generator)
            with accelerator.autocast():
                parts = trainee.forward(**inputs).loss
            values, norm = backward_and_step(
                accelerator, trainee.optimizer, parts, trainee.params, config.optim.grad_clip, step, manager.latest
            )
        grad_norm = norm if norm is not None else grad_norm
        losses.append(values)
    trainee.scheduler.step()
    if trainee.ema is not None:
        trainee.ema.update(trainee.unwrapped, step=step + 1)
    means = {name: sum(values[name] for values in losses) / len(losses) for name in losses[0]}
    return means, samples, tokens, grad_norm


def _log(accelerator, window: LogWindow, step: int, scheduler, grad_norm: float, config, flops, progress) -> None:
    """One log line and TensorBoard point: loss means over the window (all ranks), throughput, MFU."""
    elapsed = time.perf_counter() - window.start
    names = sorted(window.sums)  # the same order on every rank: the reduce is element-wise
    means = torch.tensor([window.means()[name] for name in names], device=accelerator.device)
    means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
    parts = dict(zip(names, means.tolist(), strict=True))
    metrics = {
        **{f"train/{name}": value for name, value in parts.items()},
        "train/lr": scheduler.get_last_lr()[0],
        "train/grad_norm": grad_norm,
        "perf/samples_per_s": window.samples / elapsed,
        "perf/tokens_per_s": window.tokens / elapsed,
        "perf/step_s": elapsed / max(window.steps, 1),
    }
    if flops is not None and accelerator.device.type == "cuda":
        peak = config.peak_tflops * 1e12 * accelerator.num_processes
        metrics["perf/mfu"] = metrics["perf/samples_per_s"] * flops / peak
    accelerator.log(metrics, step=step)
    progress.set_postfix(loss=f"{parts['loss']:.4f}")
    if accelerator.is_main_process:
        log.info("step %d: %s", step, " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()))
