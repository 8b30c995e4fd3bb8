"""Resuming a run: which checkpoint, whether its config matches, and loading it on every rank.

The config given on resume is compared with the one recorded in the checkpoint before anything is
built or written; an unreadable newest checkpoint falls back to the previous one. Resuming on another
number of ranks than the checkpoint's (its ``state.json`` records ``world_size``) works and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mutor_vision.config import config_changes, upgrade
from mutor_vision.errors import ConfigError
from mutor_vision.training.checkpoints import STATE, CheckpointManager, CheckpointUnreadable
from mutor_vision.training.runtime import any_rank

log = logging.getLogger(__name__)

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
    defaults: dict[str, Any] | None = None,
    config_cls: type | None = None,
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
            check_resume_config(path, state, config, allow_change, total_steps, defaults, config_cls)
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
    defaults: dict[str, Any] | None = None,
    config_cls: type | None = None,
) -> None:
    """Refuse a resume whose config differs from the checkpoint's, except in allowed keys.

    ``defaults``: keys the recorded config lacks (added to the code since) count as unchanged at
    their default values (:func:`mutor_vision.config.config_changes`). ``config_cls``: the recorded
    config's keys of older versions are read under today's names first (:func:`mutor_vision.config.upgrade`).
    """
    step = int(state["step"])
    if total_steps is not None and step > total_steps:
        raise ConfigError(
            f"--resume: {checkpoint} is at step {step}, beyond this config's {total_steps} steps; "
            "raise steps (with --allow-change steps) to train further"
        )
    recorded = state.get("config")
    if recorded is None:
        raise ConfigError(f"--resume: {checkpoint}/{STATE} records no config to compare with")
    if config_cls is not None:
        recorded = upgrade(config_cls, recorded, f"--resume: {checkpoint}")
    changes = config_changes(recorded, config, defaults)
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


def restore(
    accelerator: Accelerator,
    manager: CheckpointManager,
    candidates: list[Path],
    config: dict[str, Any],
    allow_change: Sequence[str] = (),
    total_steps: int | None = None,
    defaults: dict[str, Any] | None = None,
    config_cls: type | None = None,
) -> tuple[int, Path | None]:
    """Load the first loadable of ``candidates`` (all ranks, after prepare); return its step and path
    ((0, None) without one).

    A checkpoint whose files cannot be read (a truncated optimizer file, say) is set aside as
    ``unreadable-step_…`` with a warning and the previous one is tried: the ranks agree on every
    outcome, so all of them load the same checkpoint. Resuming an older checkpoint than the newest
    starts a new timeline: newer ones are set aside (see ``set_aside_after``).
    """
    for index, path in enumerate(candidates):
        state = manager.read_state(path)
        if index:  # the first was checked before anything was built
            check_resume_config(path, state, config, allow_change, total_steps, defaults, config_cls)
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
        note = rank_change_note(state.get("world_size"), accelerator.num_processes)
        if note is not None and accelerator.is_main_process:
            log.warning("%s", note)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            manager.set_aside_after(step)
        accelerator.wait_for_everyone()
        return step, path
    return 0, None


def rank_change_note(written: Any, ranks: int) -> str | None:
    """The line a resume on another number of ranks than the checkpoint's logs (None: the same number).

    The global batch is kept (accumulation is recomputed) and the model, optimizer and schedule load
    exactly, but each rank's data stream and draws are seeded by its rank, so the steps after the
    resume see other batches than an uninterrupted run would. A checkpoint that records no world size
    says nothing here: it cannot tell.
    """
    if not isinstance(written, int) or written == ranks:
        return None
    plural = "rank" if ranks == 1 else "ranks"
    return (
        f"resumed on {ranks} {plural} (written by {written}): data order differs from an uninterrupted run; "
        "model, optimizer and schedule exact"
    )
