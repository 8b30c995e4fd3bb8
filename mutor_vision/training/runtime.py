"""The pieces of the training loop (``loop.py``): the accelerator, stop signals, the optimizer step."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, recursively_apply

from mutor_vision.core.device import to_device
from mutor_vision.errors import ConfigError, TrainingDiverged
from mutor_vision.parallelize import fsdp_mixed_precision
from mutor_vision.processes import process_state, use_cuda

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
        log.warning(
            "mixed_precision bf16 requested without CUDA: running fp32 (bf16 on the CPU is far slower than fp32)"
        )
        mixed_precision = "no"
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=global_batch // per_step,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )
    fsdp_mixed_precision(accelerator)
    return accelerator, global_batch // per_step


@dataclass
class TrainResult:
    step: int
    reason: str  # "completed" | "terminated"
    losses: list[float] = field(default_factory=list)  # this rank's mean loss per optimizer step
    checkpoint: Path | None = None  # the last one saved; on a resume with nothing to do, the one resumed
    nothing_to_do: bool = False  # resumed at (or past) the last step: no step ran, nothing was saved


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


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, maybe nested) on ``device``, never waiting for the GPU (``core/device.py``):
    the host meanwhile prepares the step (register layout, mask) while the last step's update runs."""
    return recursively_apply(to_device, batch, device)


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

    ``parts`` are the model's named loss parts (``loss`` is backpropagated). Returns them as floats
    (one host sync) and the global grad norm on boundaries (None between them). The norm is the same
    on every rank, so all ranks stop together.
    """
    accelerator.backward(parts["loss"])
    names = list(parts)
    values = dict(zip(names, torch.stack([parts[n].detach().float() for n in names]).tolist(), strict=True))
    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip or math.inf))
        if not math.isfinite(grad_norm) or not math.isfinite(values["loss"]):
            described = ", ".join(f"{name} {value}" for name, value in values.items())
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {step} ({described}, grad norm {grad_norm}); "
                f"no update applied, last good checkpoint: {last_checkpoint()}"
            )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, grad_norm
