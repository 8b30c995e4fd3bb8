"""Seeds derived from integers, identical in every process and on every run."""

from __future__ import annotations

import hashlib


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, rank, step) or (seed, sample index)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
