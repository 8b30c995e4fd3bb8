"""Where a model, tokenizer or dataset named by a config key or a flag comes from: a local path, the
local Hugging Face cache, or the hub.

A name that cannot be had stops within seconds with one line naming the key or flag to set. A local
path is checked as a path; a hub name is used as is when the hub can be reached, else from the local
cache with the libraries held offline (``mutor_vision/hub.py`` decides), else it is an :class:`InputError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mutor_vision.errors import InputError, first_line
from mutor_vision.hub import in_cache, is_hub_name, libraries_offline, offline_reason

MODEL_FILES = ("config.json",)  # what a Hugging Face model / tokenizer directory has, one of
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a local directory or a hub name, and whether to stay off the network."""

    name: str
    key: str  # the config key or flag it came from, for messages
    local_files_only: bool = False  # a local directory, or a hub name from the cache while offline


def locate_model(name: str, key: str, what: str = "model") -> ModelSource:
    """A local model (or tokenizer) directory or a usable hub name; else one-line :class:`InputError`
    naming ``key``. Decided in seconds: a hub name is looked up in the local cache when offline."""
    path = Path(name).expanduser()
    if path.is_dir():
        expected = MODEL_FILES if what == "model" else TOKENIZER_FILES
        if not any((path / file).is_file() for file in expected):
            raise InputError(f"{key} {name!r}: no {' or '.join(expected)} in it (not a Hugging Face {what} directory)")
        return ModelSource(str(path), key, local_files_only=True)
    if path.exists() or not is_hub_name(name):
        kind = "not a directory" if path.exists() else "no such directory"
        raise InputError(f"{key} {name!r}: {kind} (set {key} to a local {what} directory, or a hub name)")
    reason = offline_reason()
    if reason is None:
        return ModelSource(name, key)
    if in_cache(name, "config.json" if what == "model" else "tokenizer_config.json"):
        return ModelSource(name, key, local_files_only=True)
    raise InputError(
        f"{key} {name!r}: a hub name, not in the local Hugging Face cache, and {reason}: "
        f"set {key} to a local {what} directory (python -m mutor_vision.text.tiny --out DIR builds a tiny one)"
    )


def from_pretrained(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on ``source``; a missing or unreadable file is one line naming the key."""
    # local_files_only alone is not enough: transformers still asks the hub for optional files (an
    # adapter config) and retries for tens of seconds; the libraries' offline mode stops that.
    offline = libraries_offline() if source.local_files_only else contextlib.nullcontext()
    try:
        with offline:
            return loader.from_pretrained(source.name, local_files_only=source.local_files_only, **kwargs)
    except (OSError, ValueError) as error:  # how transformers reports missing, unreadable or unknown files
        raise InputError(f"{source.key} {source.name!r}: {first_line(error)}") from None


def load_hub_dataset(name: str, config: str | None, split: str, key: str, local_key: str) -> list[dict]:
    """The rows of a Hugging Face dataset split: from the hub when reachable, else from the local cache
    (the ``datasets`` package's own fallback), else one line naming ``key`` and the local ``local_key``."""
    try:
        import datasets
    except ImportError:
        raise InputError(f'{key} needs the `datasets` package (pip install -e ".[text]"), or set {local_key}') from None
    reason = offline_reason(datasets=True)
    # A flag (--data) replaces the hub name by itself; in a config the two keys exclude each other.
    use_local = f"set {local_key} to a local JSONL file" + ("" if key.startswith("-") else f" and {key} to null")
    try:
        with libraries_offline() if reason else contextlib.nullcontext():
            return list(datasets.load_dataset(name, config, split=split))
    except (ConnectionError, FileNotFoundError) as error:  # not on the hub / not cached (datasets' own types)
        if reason:
            raise InputError(
                f"{key} {name!r}: a hub dataset, not in the local cache, and {reason}: {use_local}"
            ) from None
        raise InputError(f"{key} {name!r}: {first_line(error)} (or {use_local})") from None
    except ValueError as error:  # an unknown config or split
        raise InputError(f"{key} {name!r}: {first_line(error)}") from None


def gather(*checks: Callable[[], Any]) -> list[Any]:
    """Run every check; when some raise :class:`InputError`, raise one joining their lines with "; ",
    so that a new user learns every key to set at once (the data and the model, say)."""
    results, failures = [], []
    for check in checks:
        try:
            results.append(check())
        except InputError as error:
            failures.append(str(error))
            results.append(None)
    if failures:
        raise InputError("; ".join(failures))
    return results
