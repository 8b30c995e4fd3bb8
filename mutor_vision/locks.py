"""One run at a time per output folder: an atomically created lock file, renewed while its run lives.

Two processes writing one output folder destroy each other's work (the second one's clean-up
deletes the first one's half-written checkpoint). Training (``out_dir``), ``eval/fid.py --out`` and
the encoder's ``--out`` therefore hold ``<folder>/.lock.json`` while they run:

- Created with ``O_CREAT | O_EXCL``: atomic on local disks and on NFS v3+ alike (``flock`` is not
  reliable on shared filesystems). It holds JSON: host, machine, pid, pid start time, started,
  renewed, a random token and the command.
- Renewed every :data:`RENEW_EVERY_S` seconds by a daemon thread (the ``renewed`` time).
- A holder that died leaves the file behind; it does not block for ever. On the same machine its
  pid is checked, with the process start time recorded against pid reuse; a holder on another
  machine is taken as gone once :data:`LEASE_S` seconds pass without a renewal (the clocks of the
  machines must agree to well within that). ``force=True`` (the commands' ``--force``) takes over
  from a live holder too.
- Every replacement of an existing lock file (a takeover, a renewal) and its removal happen under a
  short-lived guard file (also ``O_EXCL``), after re-reading it: two takers never both win, and a
  holder never renews or removes a lock that was taken over from it.

This module owns the file format; it imports nothing of the project except its errors.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mutor_vision.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock.json"
RENEW_EVERY_S = 30.0  # how often a holder rewrites its ``renewed`` time
LEASE_S = 300.0  # a holder on another machine not renewed for this long is taken as gone
GUARD_STALE_S = 30.0  # a guard file is held for milliseconds: one this old was left by a killed process
_UNREADABLE_GRACE_S = 5.0  # an unreadable lock younger than this is being written by its creator


def machine_id() -> str:
    """Where a pid means something: the kernel's boot and pid namespace (``""`` where unknown).

    Two containers may share a hostname but not a pid namespace; after a reboot old pids are void.
    """
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("")
    return ":".join(parts) if any(parts) else ""


def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19]) if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        return True


def describe(record: dict[str, Any]) -> str:
    """``host H, pid P, started T`` of a lock record, for messages."""
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if started else "at an unknown time"
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {when}"


def stale_reason(record: dict[str, Any] | None, now: float | None = None) -> str | None:
    """Why the holder of ``record`` is gone, or None while it may still be running."""
    if record is None:
        return "its lock file is unreadable"
    now = time.time() if now is None else now
    same_machine = record.get("host") == socket.gethostname() and record.get("machine") == machine_id()
    if same_machine and isinstance(record.get("pid"), int):
        pid = record["pid"]
        if not pid_alive(pid):
            return f"its process {pid} is gone"
        recorded, actual = record.get("pid_start"), pid_start_time(pid)
        if recorded is not None and actual is not None and recorded != actual:
            return f"pid {pid} now belongs to another process"
        return None
    renewed = record.get("renewed")
    if not isinstance(renewed, int | float) or now - renewed > LEASE_S:
        return f"its lease was not renewed for over {LEASE_S:.0f} s"
    return None


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _cannot(label: str, folder: Path, what: str, error: OSError) -> Exception:
    """The one-line error of a failed lock write: a storage fault (exit 5) or a bad folder (exit 2)."""
    message = f"{label} {folder}: cannot {what} ({error})"
    if error.errno in _STORAGE_ERRNOS:
        return StorageError(message, folder=str(folder), errno=error.errno, cause=str(error))
    return ConfigError(message)


def _read(path: Path) -> tuple[bytes | None, dict[str, Any] | None]:
    """(raw bytes, parsed record) of a lock file; (None, None) when it does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(raw)
    except ValueError:
        return raw, None
    return raw, record if isinstance(record, dict) else None


def _write_new(path: Path, record: dict[str, Any]) -> None:
    """Create ``path`` holding ``record``; FileExistsError when it exists (the atomic test-and-set)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)  # an empty lock file (a full disk) would block the next run for seconds
        raise
    os.close(fd)


def _replace(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` by ``record`` in one rename (readers see the old or the new file, never half)."""
    tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


@contextmanager
def _guard(path: Path, wait_s: float = 10.0) -> Iterator[None]:
    """Serialise whoever replaces or removes the lock file ``path`` (held for milliseconds)."""
    guard = path.with_name(f"{path.name}.guard")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > GUARD_STALE_S:  # left by a process killed holding it
                    guard.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise ConfigError(f"{path}: its guard file {guard.name} stays busy; retry in a minute") from None
            time.sleep(0.01)
    try:
        yield
    finally:
        guard.unlink(missing_ok=True)


class FolderLock:
    """A held lock on a folder; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, folder: Path, record: dict[str, Any], created: bool) -> None:
        self.folder, self.path, self.record, self.created = folder, folder / LOCK_NAME, record, created
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.record["token"]

    def start_renewing(self, every_s: float = RENEW_EVERY_S) -> None:
        """Renew the lease from a daemon thread until :meth:`release` (it dies with the process)."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                if not self.renew():
                    return

        self._thread = threading.Thread(target=loop, name=f"lock-renewal {self.folder}", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Rewrite the ``renewed`` time; False (with a warning) once the lock was taken over."""
        try:
            with _guard(self.path, wait_s=1.0):
                _, current = _read(self.path)
                if current is None or current.get("token") != self.token:
                    taker = describe(current) if current else "nobody (its lock file was removed)"
                    log.warning("%s: the lock of this run was taken over by %s", self.path, taker)
                    return False
                self.record = {**self.record, "renewed": time.time()}
                _replace(self.path, self.record)
        except (OSError, ConfigError) as error:  # a full disk, a busy guard: the next renewal tries again
            log.warning("%s: could not renew the lock (%s); retrying in %.0f s", self.path, error, RENEW_EVERY_S)
        return True

    def held(self) -> bool:
        """Whether the lock file still carries this holder's token."""
        return (_read(self.path)[1] or {}).get("token") == self.token

    def release(self) -> None:
        """Remove the lock file if it is still ours; remove the folder too if the lock created it and it is empty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            with _guard(self.path):
                if self.held():
                    self.path.unlink()
        except (OSError, ConfigError) as error:
            log.warning("%s: could not remove the lock file (%s); the next run will find it stale", self.path, error)
        if self.created:
            with suppress(OSError):
                self.folder.rmdir()  # only when empty: the run failed before writing anything

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def new_record(command: str | None = None) -> dict[str, Any]:
    """A fresh lock record of this process."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "machine": machine_id(),
        "pid": os.getpid(),
        "pid_start": pid_start_time(os.getpid()),
        "started": now,
        "renewed": now,
        "token": secrets.token_hex(16),
        "command": (command if command is not None else " ".join(sys.argv))[:1000],
    }


def acquire(folder: str | os.PathLike, label: str = "folder", force: bool = False, renew: bool = True) -> FolderLock:
    """Take the lock of ``folder`` (created if missing), or raise ConfigError naming its holder and ``--force``
    (StorageError when the disk is full).

    ``label`` names the folder's setting in messages (``out_dir``, ``--out``). A holder that is gone
    (see :func:`stale_reason`) is taken over with a warning; ``force`` takes over a live one too.
    ``renew``: start the renewal thread (off in tests that check leases).
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot(label, folder, "create the folder", error) from None
    path = folder / LOCK_NAME
    record = new_record()
    unreadable_since = None
    for _ in range(1000):  # each turn either wins, refuses, or saw the lock file change under it
        try:
            _write_new(path, record)
            return _held(folder, record, created, renew)
        except FileExistsError:
            pass
        except OSError as error:
            raise _cannot(label, folder, f"write its lock file {path.name}", error) from None
        raw, holder = _read(path)
        if raw is None:
            continue  # released just now: try to create it again
        reason = stale_reason(holder)
        if holder is None:
            # Its creator may be between creating and writing it: unreadable only counts once it stays so.
            unreadable_since = unreadable_since or time.monotonic()
            young = time.time() - _mtime(path) < _UNREADABLE_GRACE_S
            if young and time.monotonic() - unreadable_since < 2 * _UNREADABLE_GRACE_S:
                time.sleep(0.05)
                continue
        if reason is None and not force:
            raise ConfigError(
                f"{label} {folder} is in use by another run ({describe(holder)}; lock file {path.name}): wait "
                f"for it to end, or pass --force to take over if that run is gone"
            )
        try:
            with _guard(path):
                now_raw, _ = _read(path)
                if now_raw != raw:
                    continue  # renewed, released or taken meanwhile: judge again
                _replace(path, record)
        except OSError as error:
            raise _cannot(label, folder, f"take over its lock file {path.name}", error) from None
        if (_read(path)[1] or {}).get("token") == record["token"]:  # re-read: the rename is what counts
            why = reason or "--force"
            log.warning("%s %s: took over the lock of %s (%s)", label, folder, describe(holder or {}), why)
            return _held(folder, record, created, renew)
    raise ConfigError(f"{label} {folder}: its lock file {path.name} keeps changing; retry")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _held(folder: Path, record: dict[str, Any], created: bool, renew: bool) -> FolderLock:
    lock = FolderLock(folder, record, created)
    if renew:
        lock.start_renewing()
    return lock
