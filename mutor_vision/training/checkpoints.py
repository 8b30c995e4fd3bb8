"""Checkpoint directories written atomically, found for resume, pruned to the last K.

Layout under ``<out_dir>/checkpoints/``::

    step_00005000/
        accelerate/     # accelerator.save_state: model, optimizer, scheduler, EMA, RNG (all ranks)
        export/         # model.safetensors + config.json, loadable by GPT.from_pretrained
        state.json      # step and config; written last: a directory with it is complete

Everything is first written to ``.step_00005000.tmp/`` and renamed when complete, so a kill during
a save leaves the previous checkpoint untouched and the partial one ignored (and cleaned up).
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

log = logging.getLogger(__name__)
STATE = "state.json"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

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
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        export(tmp / "export")  # every rank calls it (FSDP gathers); the main process writes
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename complete checkpoints newer than ``step`` to ``abandoned-step_…`` (main process).

        Resuming an older checkpoint starts a new timeline; the newer ones must neither be picked
        by a later ``--resume auto`` nor count toward ``keep_last`` — but they are kept, not deleted.
        """
        moved = []
        for path in self.complete():
            if int(_NAME.match(path.name).group(1)) > step:
                target = path.with_name(f"abandoned-{path.name}")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(path, target)
                moved.append(target)
        if moved:
            log.warning("resumed at step %d: set aside newer checkpoints %s", step, [p.name for p in moved])
        return moved

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / STATE).read_text())
        except (OSError, ValueError) as error:
            raise RuntimeError(f"{path}: unreadable checkpoint state ({error})") from None
