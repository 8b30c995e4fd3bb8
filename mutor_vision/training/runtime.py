"""What every training loop here shares: the accelerator, stop signals, resume points, results.

The image trainer (``trainer.py``) and the text trainer (``mutor_vision/text/train.py``) differ in
data and loss only; everything below is common to both.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from mutor_vision.config import config_changes
from mutor_vision.errors import ConfigError, TrainingDiverged
from mutor_vision.processes import process_state, use_cuda
from mutor_vision.training.checkpoints import STATE, CheckpointManager, CheckpointUnreadable

log = logging.getLogger(__name__)


def make_accelerator(
    mixed_precision: str, global_batch: int, micro_batch: int, out_dir: Path, trackers: list[str], device: str = "auto"
) -> tuple[Accelerator, int]:
    """An Accelerator on ``device`` (gloo between CPU ranks), and the gradient-accumulation steps."""
    on_cuda = use_cuda(device)
    state = process_state(device)
    per_step = micro_batch * state.num_processes
    if global_batch % per_step:
        raise ConfigError(
            f"global_batch_size: {global_batch} is not divisible by micro_batch_size × ranks = {per_step}"
        )
    if mixed_precision == "bf16" and not on_cuda:
        log.warning("mixed_precision bf16 requested without CUDA: running fp32 (bf16 on CPU is ~40x slower)")
        mixed_precision = "no"
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=global_batch // per_step,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )
    reduce_fsdp_gradients_in_fp32(accelerator)
    return accelerator, global_batch // per_step


@dataclass
class TrainResult:
    step: int
    reason: str  # "completed" | "terminated"
    losses: list[float] = field(default_factory=list)  # this rank's mean loss per optimizer step
    checkpoint: Path | None = None


class StopFlag:
    """SIGTERM (and SIGINT) ask for a clean stop at the next step boundary: save, then exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: saving a checkpoint at the end of this step, then exiting", signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def reduce_fsdp_gradients_in_fp32(accelerator: Accelerator) -> None:
    """FSDP with bf16 reduces gradients in bf16 unless told otherwise (ecosystem.md §3): keep fp32."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or accelerator.mixed_precision != "bf16":
        return
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16
        )
    else:
        from torch.distributed.fsdp import MixedPrecision

        plugin.mixed_precision_policy = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
        )


# Config keys that may differ on resume without --allow-change: where the run writes and how
# often it reports. Everything else changes what the resumed steps compute.
RUN_KEYS = frozenset({"out_dir", "log_every", "tensorboard", "wandb", "keep_last", "peak_tflops"})
# Read only when a run starts fresh; a resumed run never uses them.
START_KEYS = frozenset({"init_from", "trust_checkpoint"})


def resume_candidates(
    manager: CheckpointManager,
    resume: str | None,
    config: dict[str, Any],
    allow_change: Sequence[str] = (),
    total_steps: int | None = None,
) -> list[Path]:
    """The checkpoints to try, newest first, after checking the first against ``config``.

    Called before anything is built or written: a wrong ``--resume`` or a changed config fails
    here, with the differing keys named. ``auto`` lists every complete checkpoint so that an
    unreadable newest one can fall back to the previous (see :func:`restore`).
    """
    if resume is None:
        if manager.latest() is not None:
            raise ConfigError(
                f"{manager.root} already holds checkpoints: pass --resume auto to continue, or set another out_dir"
            )
        return []
    if resume == "auto":
        candidates = manager.complete()[::-1]
        if not candidates:
            log.info("--resume auto: no complete checkpoint in %s, starting fresh", manager.root)
    else:
        path = Path(resume)
        if not (path / STATE).is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no {STATE})")
        candidates = [path]
    readable = []
    for path in candidates:
        try:
            state = manager.read_state(path)
        except CheckpointUnreadable as error:
            if resume != "auto":
                raise
            log.warning("%s; trying the previous checkpoint", error)
            continue
        if not readable:
            check_resume_config(path, state, config, allow_change, total_steps)
        readable.append(path)
    if candidates and not readable:
        raise CheckpointUnreadable(f"{manager.root}: no checkpoint with a readable {STATE}")
    return readable


def check_resume_config(
    checkpoint: Path,
    state: dict[str, Any],
    config: dict[str, Any],
    allow_change: Sequence[str] = (),
    total_steps: int | None = None,
) -> None:
    """Refuse a resume whose config differs from the checkpoint's, except in allowed keys."""
    step = int(state["step"])
    if total_steps is not None and step > total_steps:
        raise ConfigError(
            f"--resume: {checkpoint} is at step {step}, beyond this config's {total_steps} steps; "
            "raise steps (with --allow-change steps) to train further"
        )
    recorded = state.get("config")
    if recorded is None:
        raise ConfigError(f"--resume: {checkpoint}/{STATE} records no config to compare with")
    changes = config_changes(recorded, config)
    ignored = RUN_KEYS | START_KEYS
    changes = {key: values for key, values in changes.items() if key not in ignored}
    refused = [key for key in changes if not any(key == a or key.startswith(f"{a}.") for a in allow_change)]
    if refused:
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise ConfigError(
            f"--resume: {checkpoint} was trained with another config ({listed}). Resume with the recorded "
            f"config (its {STATE}, or out_dir/config.yaml), or accept the change knowingly with "
            f"--allow-change {','.join(refused)}"
        )
    for key, (old, new) in changes.items():
        log.warning("resuming with a changed config (allowed): %s: %r -> %r", key, old, new)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def flat_hparams(data: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """TensorBoard hparams take only scalars: flatten nested dicts, stringify the rest."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def backward_and_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    parts,
    params: list[torch.nn.Parameter],
    grad_clip: float,
    step: int,
    last_checkpoint: Callable[[], Path | None],
) -> tuple[list[float], float | None]:
    """Backward one micro-batch inside ``accelerator.accumulate``; on the accumulation boundary clip,
    refuse a non-finite loss or gradient (before any update), then step.

    Returns the (loss, L_ntp, L_reg) floats of this micro-batch (one host sync) and the global grad
    norm on boundaries (None between them). The norm is the same on every rank, so all ranks stop
    together.
    """
    accelerator.backward(parts.loss)
    values = torch.stack([parts.loss.detach(), parts.ntp, parts.reg]).tolist()
    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip or math.inf))
        if not math.isfinite(grad_norm) or not math.isfinite(values[0]):
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {step} (loss {values[0]}, L_ntp {values[1]}, "
                f"L_reg {values[2]}, grad norm {grad_norm}); no update applied, "
                f"last good checkpoint: {last_checkpoint()}"
            )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, grad_norm


def restore(
    accelerator: Accelerator,
    manager: CheckpointManager,
    candidates: list[Path],
    config: dict[str, Any],
    allow_change: Sequence[str] = (),
    total_steps: int | None = None,
) -> int:
    """Load the first loadable of ``candidates`` (all ranks, after prepare); return its step, 0 without one.

    A checkpoint whose files cannot be read (a truncated optimizer file, say) is set aside as
    ``unreadable-step_…`` with a warning and the previous one is tried: the ranks agree on every
    outcome, so all of them load the same checkpoint. Resuming an older checkpoint than the newest
    starts a new timeline: newer ones are set aside (see ``set_aside_after``).
    """
    for index, path in enumerate(candidates):
        state = manager.read_state(path)
        if index:  # the first was checked before anything was built
            check_resume_config(path, state, config, allow_change, total_steps)
        failure = None
        try:
            accelerator.load_state(str(path / "accelerate"))
        except Exception as error:  # torch, safetensors and pickle each raise their own types
            failure = f"{type(error).__name__}: {str(error)[:300]}"
        if any_rank(accelerator, failure is not None):
            message = f"{path}: checkpoint files unreadable ({failure or 'on another rank'})"
            if index + 1 == len(candidates):
                raise CheckpointUnreadable(message + "; no older checkpoint to fall back to")
            log.warning("%s; falling back to %s", message, candidates[index + 1])
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                manager.set_aside(path, "unreadable")
            continue
        step = int(state["step"])
        log.info("resumed from %s at step %d", path, step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            manager.set_aside_after(step)
        accelerator.wait_for_everyone()
        return step
    return 0
