"""Files that are either wholly old or wholly new: the one way this project writes a file.

A writer fills a temp file beside the target (``.<name>.tmp``), flushes it to disk, and renames it
over the target; rename is atomic on one filesystem, so a kill at any moment leaves the previous
file or the new one, never a mix. A later attempt reuses the same temp name, so a kill leaves no
growing litter. Durable writes also flush the directory entry, so a completed rename survives a
power loss too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# mkstemp-style temp files are 0600; renamed results get the mode a plain open() would give
# (0666 minus the umask) so others on a shared cluster can read exports. Python has no getumask:
# read it by setting it once, at import, before any thread exists.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def temp_path(path: Path, unique: bool = False) -> Path:
    """The temp name beside ``path``; ``unique`` adds the pid for targets several processes may write."""
    suffix = f".{os.getpid()}.tmp" if unique else ".tmp"
    return path.with_name(f".{path.name}{suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], Any], durable: bool = True, unique: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temp file, then rename it over ``path``; return ``path``.

    ``durable`` flushes the file and the directory to disk (checkpoints, shards, manifests); cheap
    many-file outputs whose loss a rerun repairs (sample PNGs) may skip it.
    """
    path = Path(path)
    tmp = temp_path(path, unique)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)


def atomic_write_json(path: str | Path, data: Any, durable: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", durable=durable)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and directory under ``root`` (before the rename that marks it complete)."""
    root = Path(root)
    for directory, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(directory) / name)
        fsync_dir(directory)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: what keys anything derived from the file (never its name alone)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_stamp(
    path: str | Path,
    settings: dict[str, Any],
    outputs_exist: bool,
    remedy: str,
    write: bool,
    defaults: dict[str, Any] | None = None,
) -> None:
    """A settings stamp beside resumable outputs: never mix outputs made with different settings.

    Refuses (``ConfigError``, naming the differing keys) when ``path`` records other settings and
    outputs made with them exist; otherwise (``write``) records ``settings``. A stamp without
    outputs (a run that failed before writing any) is simply replaced. ``defaults`` (dotted keys):
    a key the stamp lacks — added to the code since — is unchanged at its default value.
    """
    from mutor_vision.config import config_changes
    from mutor_vision.errors import ConfigError

    path = Path(path)
    current = json.loads(json.dumps(settings))
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if recorded == current:
        return
    if recorded is not None and outputs_exist:
        changed = ", ".join(config_changes(recorded, current, defaults))
        if not changed:  # only keys added since, at their defaults: the stamp is brought up to date
            if write:
                atomic_write_json(path, current)
            return
        raise ConfigError(f"{path.parent} holds outputs made with other settings ({changed}); {remedy}")
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, current)
