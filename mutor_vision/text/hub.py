"""Where a model, tokenizer or dataset named by a config key or a flag comes from: a local path, the
local Hugging Face cache, or the hub.

Without network access the libraries retry for tens of seconds and end in a traceback; here a name
that cannot be had stops within seconds with one line naming the key or flag to set. A local path is
checked as a path; a hub name is used as is when the hub can be reached, else from the local cache
with the libraries held offline, else it is an :class:`InputError`. "Reached" is decided once per
process: the offline variables (``HF_HUB_OFFLINE`` and friends, which the libraries honour too), else
one TCP connect of at most two seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mutor_vision.errors import InputError

_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gsm8k", "google/gemma-2b"
PROBE_TIMEOUT_S = 2.0
MODEL_FILES = ("config.json",)  # what a Hugging Face model / tokenizer directory has, one of
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _env_true(value: str | None) -> bool:
    return (value or "").strip().upper() in _TRUE


def offline_variable(datasets: bool = False) -> str | None:
    """``NAME=value`` of the variable that puts the libraries offline, or None.

    The libraries' own rules: ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) for models, and
    for datasets ``HF_DATASETS_OFFLINE`` when it is set."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
    if datasets and os.environ.get("HF_DATASETS_OFFLINE") is not None:
        names = ["HF_DATASETS_OFFLINE"]
    name = next((n for n in names if os.environ.get(n)), None)  # the first one set decides
    return f"{name}={os.environ[name]}" if name and _env_true(os.environ[name]) else None


def _probe_address() -> tuple[str, int]:
    """The host the libraries would connect to first: the HTTPS proxy if one is set, else the endpoint."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            proxy = urlsplit(os.environ[name] if "://" in os.environ[name] else f"http://{os.environ[name]}")
            return proxy.hostname or "", proxy.port or 80
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to the hub (or the proxy) opens within ``timeout`` seconds.

    In a daemon thread: a name lookup can hang past any socket timeout, and must not hold the command."""
    host, port = _probe_address()
    opened: list[bool] = []

    def attempt() -> None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            opened.append(True)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(opened)


def offline_reason(datasets: bool = False) -> str | None:
    """Why the hub cannot be used ("HF_HUB_OFFLINE=1", "no connection to huggingface.co:443"), or None."""
    variable = offline_variable(datasets)
    if variable:
        return variable
    if not hub_reachable():
        host, port = _probe_address()
        return f"no connection to {host}:{port}"
    return None


def is_hub_name(name: str) -> bool:
    """Whether ``name`` can be a hub repository id (``name`` or ``namespace/name``), not a path."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def _in_cache(repo_id: str, filename: str) -> bool:
    # lazy: Hugging Face libraries (the `text` extra) load only where used
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


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
    if _in_cache(name, "config.json" if what == "model" else "tokenizer_config.json"):
        return ModelSource(name, key, local_files_only=True)
    raise InputError(
        f"{key} {name!r}: a hub name, not in the local Hugging Face cache, and {reason}: "
        f"set {key} to a local {what} directory (python -m mutor_vision.text.tiny --out DIR builds a tiny one)"
    )


def from_pretrained(loader: Any, source: ModelSource, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on ``source``; a missing or unreadable file is one line naming the key."""
    # local_files_only alone is not enough: transformers still asks the hub for optional files (an
    # adapter config) and retries for tens of seconds; the libraries' offline mode stops that.
    offline = _libraries_offline() if source.local_files_only else contextlib.nullcontext()
    try:
        with offline:
            return loader.from_pretrained(source.name, local_files_only=source.local_files_only, **kwargs)
    except (OSError, ValueError) as error:  # how transformers reports missing, unreadable or unknown files
        raise InputError(f"{source.key} {source.name!r}: {_first_line(error)}") from None


@contextlib.contextmanager
def _libraries_offline() -> Iterator[None]:
    """The libraries' offline mode for the duration: they read ``HF_HUB_OFFLINE`` once, at import, into
    these flags, and consult the flags at each request."""
    from huggingface_hub import constants  # lazy: Hugging Face libraries (the `text` extra) load only where used

    # datasets keeps its own copy; not imported yet, it has nothing to stop (and costs a second to import).
    flags = [module for module in (constants, sys.modules.get("datasets.config")) if module is not None]
    saved = [module.HF_HUB_OFFLINE for module in flags]
    for module in flags:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(flags, saved, strict=True):
            module.HF_HUB_OFFLINE = value


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
        with _libraries_offline() if reason else contextlib.nullcontext():
            return list(datasets.load_dataset(name, config, split=split))
    except (ConnectionError, FileNotFoundError) as error:  # not on the hub / not cached (datasets' own types)
        if reason:
            raise InputError(
                f"{key} {name!r}: a hub dataset, not in the local cache, and {reason}: {use_local}"
            ) from None
        raise InputError(f"{key} {name!r}: {_first_line(error)} (or {use_local})") from None
    except ValueError as error:  # an unknown config or split
        raise InputError(f"{key} {name!r}: {_first_line(error)}") from None


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
