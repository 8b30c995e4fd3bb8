"""Files that are either wholly old or wholly new: the one way this project writes a file.

A writer fills a temp file beside the target (``.<name>.tmp``), flushes it to disk, and renames it
over the target; rename is atomic on one filesystem, so a kill at any moment leaves the previous
file or the new one, never a mix. A later attempt reuses the same temp name, so a kill leaves no
growing litter. Durable writes also flush the directory entry, so a completed rename survives a
power loss too.

A write that fails for lack of room or a failing disk (ENOSPC, EFBIG, EDQUOT, EIO, and torch's
serialization error that loses the errno) is told apart from a bug here, once for every format:
``storage_faults`` turns it into a :class:`StorageError` naming the folder and the OS error (exit 5).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mutor_vision.config import config_changes
from mutor_vision.errors import ConfigError, StorageError

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


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a Markdown file with
    ``body`` (generated tables and figures; the rest of the file is left as written). A file without
    both markers is an error that names them."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{path.name} has no {start} ... {end} section")
    head, rest = content.split(start, 1)
    atomic_write_text(path, f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")


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


# ---------------------------------------------------------------- storage faults: a full disk, a size limit, EIO

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO})
# torch's zip writer turns a short write into a RuntimeError without the errno ("unexpected pos",
# "PytorchStreamWriter failed writing file"); its reader's errors (a corrupt file) are other texts.
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+|PytorchStreamWriter failed writing|file write failed")
# safetensors (Rust) reports the OS error in its message: "I/O error: ... (os error 28)".
_RUST_OS_ERROR = re.compile(r"os error (\d+)|code: (\d+)")
_NEARLY_FULL = 64 << 20  # bytes free under which a write failure without an errno is taken as ENOSPC


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def storage_errno(error: BaseException) -> int | None:
    """The storage errno (ENOSPC, EFBIG, EDQUOT, EIO) behind ``error`` or its chain, None if there is none."""
    for link in _chain(error):
        if isinstance(link, StorageError) and link.errno is not None:
            return link.errno
        if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
            return link.errno
        if type(link).__name__ == "SafetensorError":
            for match in _RUST_OS_ERROR.finditer(str(link)):
                code = int(match.group(1) or match.group(2))
                if code in STORAGE_ERRNOS:
                    return code
    return None


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is a failed write for lack of room or a failing disk, not a bug or bad input.

    True for an OSError (or a safetensors error) with a storage errno, and for torch's serialization
    error that lost it: torch raises that only for a short write.
    """
    for link in _chain(error):
        if isinstance(link, StorageError):
            return True
        if isinstance(link, RuntimeError) and _TORCH_WRITE_FAILED.search(str(link)):
            return True
    return storage_errno(error) is not None


def storage_error(error: BaseException, folder: str | Path | None, what: str) -> StorageError | None:
    """``error`` as one line naming what failed, the OS error and ``folder``; None when it is no storage fault.

    ``folder`` None: where is unknown (a write no owner wrapped, whose error names no file).

    Call it before removing the partial output: where the errno was lost, the free space and the
    file size limit (``ulimit -f``) at the time of the failure tell ENOSPC from EFBIG.
    """
    if not is_storage_error(error):
        return None
    inner = next((link for link in _chain(error) if isinstance(link, StorageError) and link.cause), None)
    code, cause = (inner.errno, inner.cause) if inner is not None else _describe(error, folder)
    if folder is None:
        return StorageError(f"{what}: {cause}", errno=code, cause=cause)
    return StorageError(f"{what}: {cause} ({folder})", folder=str(folder), errno=code, cause=cause)


def _describe(error: BaseException, folder: str | Path | None) -> tuple[int | None, str]:
    """The errno and its text, with what tells it where the errno was lost."""
    code = storage_errno(error)
    free, limit = None if folder is None else free_bytes(folder), file_size_limit()
    notes = []
    if code is None:  # torch's writer lost it: tell from the limit and the free space
        notes.append("inferred: torch's writer lost the OS error")
        if limit is not None:
            code = errno.EFBIG
        elif free is not None and free < _NEARLY_FULL:
            code = errno.ENOSPC
    if code == errno.EFBIG and limit is not None:
        notes.append(f"the file size limit (ulimit -f) is {limit:,} bytes")
    if free is not None and code in (errno.ENOSPC, errno.EDQUOT, None):
        notes.append(f"{format_bytes(free)} free")
    cause = f"[Errno {code}] {os.strerror(code)}" if code is not None else "a write failed"
    return code, cause + (f" ({'; '.join(notes)})" if notes else "")


@contextmanager
def storage_faults(folder: str | Path, what: str) -> Iterator[None]:
    """Raise a storage fault in the block as :class:`StorageError` (exit code 5); anything else as it is.

    A StorageError from a nested block goes through unchanged: the innermost owner names its file best.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        wrapped = storage_error(error, folder, what)
        if wrapped is None:
            raise
        raise wrapped from error


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free to this user on the filesystem of ``folder`` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def file_size_limit() -> int | None:
    """This process's file size limit in bytes (``ulimit -f``, RLIMIT_FSIZE), None when unlimited."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def space_warning(folder: str | Path, need: int, what: str, largest_file: int = 0) -> str | None:
    """A one-line warning when ``folder`` cannot hold ``need`` bytes (or a file of ``largest_file``), else None."""
    problems = []
    free = free_bytes(folder)
    if free is not None and free < need:
        problems.append(f"{format_bytes(free)} free, {what} need about {format_bytes(need)}")
    limit = file_size_limit()
    if limit is not None and largest_file > limit:
        problems.append(f"the file size limit (ulimit -f) is {limit:,} bytes, the largest file about {largest_file:,}")
    if not problems:
        return None
    return f"low on space in {folder}: {'; '.join(problems)}; writing will fail (exit 5) unless room is made"


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
