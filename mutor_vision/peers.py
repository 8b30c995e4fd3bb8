"""Noticing a lost peer within seconds, and waiting for a slow one for as long as it lives.

A collective (a barrier, a gather) waits for every rank until its timeout. A rank that died is
noticed at once by gloo when its machine closes the connections, but a machine that vanished from
the network, or NCCL, holds the others for the whole timeout; and a rank that is only slow (a resumed
evaluation where one rank has hours of samples left) trips a short one. Here every rank beats a
heartbeat into the job's key-value store — the one torch.distributed met through, served by the
first machine — and :meth:`Peers.wait` waits at a named point for every rank, however long they take
while they beat, and stops within ``DEAD_AFTER_S`` of a rank's last beat, or at once when the store
is gone. :meth:`Peers.check` raises at once when a peer was lost; long loops call it between steps.
A rank that stops with an error of its own says so first (:func:`announce_failure`), and the others
stop at their next check with its reason.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import socket
import threading
import time

import torch.distributed as dist

from mutor_vision.errors import PeerLost, first_line

HEARTBEAT_S = 1.0  # seconds between a rank's beats
DEAD_AFTER_S = 15.0  # a rank whose beat has not moved for this long is lost
POLL_S = 0.2  # how often a waiting rank looks at the store
_PREFIX = "mutor/peers"
_FAILED = f"{_PREFIX}/failed"  # "<rank>\n<its one line>" of the first rank that stopped with an error


class Peers:
    """This rank's view of the others through the job's store (one per process: :func:`peers`)."""

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.failure: str | None = None  # the heartbeat thread's store error, once it has one
        self.waits = 0  # wait points passed: every rank passes the same ones in the same order
        start = time.monotonic()
        self.seen = {r: (-1, start) for r in range(world) if r != rank}  # rank -> (beat, when it last moved)
        self._call(store.set, f"{_PREFIX}/host/{rank}", socket.gethostname())
        self._closed = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="mutor-heartbeat", daemon=True)
        self._beating.start()
        # A daemon thread still inside the store's C++ call when the interpreter ends aborts the
        # process (exit 134 instead of the command's own code): stop it first.
        atexit.register(self.close)

    def _beat(self) -> None:
        while self.failure is None and not self._closed.is_set():
            try:
                self.store.add(f"{_PREFIX}/beat/{self.rank}", 1)
            except Exception as error:  # the store's host is gone, or the network
                self.failure = _first_sentence(error)
                return
            self._closed.wait(HEARTBEAT_S)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the heartbeat (at exit: :mod:`atexit` calls it). ``timeout`` bounds the wait for a beat
        under way on a store that stopped answering."""
        self._closed.set()
        self._beating.join(timeout)

    def _call(self, op, *args):
        try:
            return op(*args)
        except Exception as error:
            raise PeerLost(
                f"the job's store (on the first machine) cannot be reached: {_first_sentence(error)}"
            ) from None

    def _host(self, rank: int) -> str:
        try:
            return self.store.get(f"{_PREFIX}/host/{rank}").decode()
        except Exception:
            return "its machine"

    def announce(self, what: str) -> None:
        """Tell the other ranks this one stops, and why (best effort: the store may be gone too)."""
        if self.failure is None:  # torch warns, with its C++ stack, at each use of a store known gone
            with contextlib.suppress(Exception):
                self.store.set(_FAILED, f"{self.rank}\n{what}")

    def check(self) -> None:
        """Raise :class:`PeerLost` when the store is gone, a rank said it stopped, or a rank's heartbeat
        stopped moving."""
        if self.failure is not None:
            raise PeerLost(f"the job's store (on the first machine) cannot be reached: {self.failure}")
        if self._call(self.store.check, [_FAILED]):
            rank, what = self._call(self.store.get, _FAILED).decode().split("\n", 1)
            raise PeerLost(f"rank {rank} ({self._host(int(rank))}) stopped: {what}")
        now = time.monotonic()
        for rank, (beat, moved) in self.seen.items():
            current = int(self._call(self.store.add, f"{_PREFIX}/beat/{rank}", 0))
            if current != beat:
                self.seen[rank] = (current, now)
            elif now - moved > DEAD_AFTER_S:
                raise PeerLost(f"rank {rank} ({self._host(rank)}) stopped answering {now - moved:.0f} s ago")

    def wait(self, name: str) -> None:
        """Every rank at point ``name``: returns when all have arrived, raises :class:`PeerLost` when one
        was lost first. No deadline while they all live."""
        self.waits += 1
        key = f"{_PREFIX}/wait/{self.waits}/{name}"
        self._call(self.store.add, key, 1)
        while int(self._call(self.store.add, key, 0)) < self.world:
            self.check()
            time.sleep(POLL_S)


class _Alone:
    """One process: nobody to lose or wait for."""

    def announce(self, what: str) -> None:
        pass

    def check(self) -> None:
        pass

    def wait(self, name: str) -> None:
        pass


@functools.cache
def _peers(rank: int, world: int) -> Peers:
    return Peers(dist.distributed_c10d._get_default_store(), rank, world)


def peers() -> Peers | _Alone:
    """This process's :class:`Peers` once torch.distributed runs with several ranks, else a no-op."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return _Alone()
    return _peers(dist.get_rank(), dist.get_world_size())


def announce_failure(what: str) -> None:
    """This rank stops with the error ``what``: the other ranks' next check stops them with it. Only
    where this process waits through :func:`peers` already (a new heartbeat now would only add noise
    on a store that may be gone); the other commands' ranks meet in collectives, which fail at once."""
    if _peers.cache_info().currsize:
        with contextlib.suppress(Exception):
            peers().announce(what)


def _first_sentence(error: BaseException) -> str:
    return first_line(error).split(". ")[0]  # torch's store errors go on with guesses at the cause
