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

from mutor_vision.errors import InputError, StorageError
from mutor_vision.files import (
    atomic_write_json,
    format_bytes,
    fsync_dir,
    fsync_tree,
    space_warning,
    storage_error,
    storage_faults,
)
from mutor_vision.training.runtime import any_rank

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
        export: Callable[[Path, int], None],
    ) -> Path:
        """Save on all ranks (accelerate requires it); the main process finalises and prunes.

        A storage fault (a full disk, a file size limit, EIO) on any rank stops every rank with a
        :class:`StorageError` naming the newest complete checkpoint, after the main process removed
        the partial one: the previous checkpoints are untouched and a resume continues from them.
        """
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        what = f"cannot save checkpoint {final.name}"
        if accelerator.is_main_process:
            with storage_faults(self.root, what):
                self.root.mkdir(parents=True, exist_ok=True)
                self._discard(tmp)
                tmp.mkdir()
        accelerator.wait_for_everyone()

        def write_states() -> None:
            accelerator.save_state(str(tmp / "accelerate"))
            export(tmp / "export", step)  # every rank calls it (FSDP gathers); the main process writes

        def write_step() -> None:
            atomic_write_json(tmp / STATE, {"step": step, **state})
            fsync_tree(tmp)  # every byte on disk before the rename that marks the checkpoint complete

        self._stop_on_failure(accelerator, self._storage_fault(write_states, what), tmp, what)
        failure = self._storage_fault(write_step, what) if accelerator.is_main_process else None
        self._stop_on_failure(accelerator, failure, tmp, what)
        if accelerator.is_main_process:
            if final.exists():
                self._discard(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _storage_fault(self, write: Callable[[], None], what: str) -> StorageError | None:
        """Run ``write``; a storage fault comes back (every rank then stops together), any other error is raised."""
        try:
            write()
        except Exception as error:
            failure = storage_error(error, self.root, what)
            if failure is None:
                raise
            return failure
        return None

    def _stop_on_failure(self, accelerator, failure: StorageError | None, tmp: Path, what: str) -> None:
        """Every rank stops together when one failed to write (none waits for it forever)."""
        if not any_rank(accelerator, failure is not None):
            return
        if accelerator.is_main_process:
            try:
                self._discard(tmp)
            except OSError:  # the rename itself can fail on a full disk: delete in place
                shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if failure is None:
            failure = StorageError(f"{what}: a write failed on another rank ({self.root})", folder=str(self.root))
        latest = self.latest()
        removed = "the partial checkpoint was removed" if not tmp.exists() else f"remove the partial {tmp}"
        newest = f"the newest complete one is {latest}" if latest else "no complete checkpoint yet"
        message = f"{failure}; {removed}, {newest}"
        raise StorageError(message, folder=failure.folder, errno=failure.errno, cause=failure.cause) from failure

    def check_space(self, parameters: int, trainable: int, ema: bool) -> str | None:
        """Warn (and return the line) when the folder cannot hold ``keep_last`` checkpoints + the one being written.

        Those already there count: a resumed run needs room for the ones still to come only.
        """
        size, largest = checkpoint_bytes(parameters, trainable, ema)
        more = self.keep_last + 1 - min(len(self.complete()), self.keep_last)
        what = f"{more} more checkpoint(s) (keep_last {self.keep_last} + one being saved, ~{format_bytes(size)} each)"
        warning = space_warning(self.root, more * size, what, largest)
        if warning:
            log.warning("%s", warning)
        return warning

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


def checkpoint_bytes(parameters: int, trainable: int, ema: bool) -> tuple[int, int]:
    """About the bytes of one checkpoint and of its largest file, from the parameter counts.

    accelerate's weights and the export hold every parameter in fp32, AdamW's state two fp32
    moments per trainable one; EMA adds its copy and its export. (A LoRA export is smaller.)
    """
    weights, optimizer = 4 * parameters, 8 * trainable
    return 2 * weights + optimizer + (2 * weights if ema else 0), max(weights, optimizer)


class CheckpointUnreadable(InputError):
    """A checkpoint's files cannot be read back (truncated, corrupt, or missing)."""
