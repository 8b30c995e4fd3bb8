"""Checkpoint directories written atomically, found for resume, pruned to the last K.

Layout under ``<out_dir>/checkpoints/``::

    step_00005000/
        accelerate/     # accelerator.save_state: model, optimizer, scheduler, EMA, RNG (all ranks)
        export/         # model.safetensors + config.json, loadable by GPT.from_pretrained
        state.json      # step and config; written last: a directory with it is complete

Everything is first written to ``.step_00005000.tmp/``, flushed to disk, and renamed when complete,
so a kill during a save leaves the previous checkpoint untouched and the partial one ignored (and
cleaned up). Directories are deleted by renaming them to ``.<name>.trash`` first, so a kill during
a deletion never leaves a half-deleted checkpoint that looks complete, or one that is never
cleaned up. Checkpoints that must not be resumed but are kept (an abandoned timeline, an
unreadable file) are renamed ``<reason>-step_…``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mutor_vision.errors import InputError
from mutor_vision.files import atomic_write_json, fsync_dir, fsync_tree

log = logging.getLogger(__name__)
STATE = "state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_step(path: Path) -> int:
    """The step encoded in a ``step_XXXXXXXX`` directory name."""
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint directory name (step_XXXXXXXX)")
    return int(match.group(1))


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
        return sorted(found, key=checkpoint_step)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(
        self,
        accelerator,
        step: int,
        state: dict[str, Any],
        export: Callable[[Path], None],
    ) -> Path:
        """Save on all ranks (accelerate requires it); the main process finalises and prunes."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            self._discard(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        export(tmp / "export")  # every rank calls it (FSDP gathers); the main process writes
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE, {"step": step, **state})
            fsync_tree(tmp)  # every byte on disk before the rename that marks the checkpoint complete
            if final.exists():
                self._discard(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _discard(self, path: Path) -> None:
        """Delete a directory so that a kill at any moment leaves it either whole or out of sight."""
        if not path.exists():
            return
        trash = path.with_name(f".{path.name.lstrip('.')}.trash")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            self._discard(old)
        for stale in [*self.root.glob(".step_*.tmp"), *self.root.glob(".*.trash")]:  # interrupted saves/deletes
            shutil.rmtree(stale, ignore_errors=True)
        for orphan in self.root.iterdir():  # step_* without state.json: the remains of an older, non-atomic delete
            if _NAME.match(orphan.name) and orphan.is_dir() and not (orphan / STATE).exists():
                log.warning("removing incomplete checkpoint directory %s (no %s)", orphan, STATE)
                self._discard(orphan)

    def set_aside(self, path: Path, reason: str) -> Path:
        """Rename a complete checkpoint to ``<reason>-step_…``: kept, but never resumed or pruned."""
        target = path.with_name(f"{reason}-{path.name}")
        self._discard(target)
        os.replace(path, target)
        return target

    def set_aside_after(self, step: int) -> list[Path]:
        """Set aside (``abandoned-step_…``) complete checkpoints newer than ``step`` (main process).

        Resuming an older checkpoint starts a new timeline: the newer ones must neither be picked by
        a later ``--resume auto`` nor count toward ``keep_last`` — but they are kept, not deleted.
        """
        moved = [self.set_aside(path, "abandoned") for path in self.complete() if checkpoint_step(path) > step]
        if moved:
            log.warning("resumed at step %d: set aside newer checkpoints %s", step, [p.name for p in moved])
        return moved

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        try:
            state = json.loads((path / STATE).read_text())
            int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointUnreadable(f"{path / STATE}: unreadable checkpoint state ({error})") from None
        return state


class CheckpointUnreadable(InputError):
    """A checkpoint's files cannot be read back (truncated, corrupt, or missing)."""
