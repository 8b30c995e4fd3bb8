"""Whether the Hugging Face Hub can be used now, decided in seconds, and the libraries held offline
when it cannot: the text adapter's models and data (``text/hub.py``) and image exports
(``GPT.from_pretrained`` with a Hub id) both ask here.

Without network access the libraries retry for tens of seconds and end in a traceback. "Reached" is
decided once per process: the offline variables (``HF_HUB_OFFLINE`` and friends, which the
libraries honour too), else one TCP connect of at most two seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gsm8k", "google/gemma-2b"
PROBE_TIMEOUT_S = 2.0


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


def in_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # lazy: a slow import, needed only for Hub names

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


@contextlib.contextmanager
def libraries_offline() -> Iterator[None]:
    """The libraries' offline mode for the duration: they read ``HF_HUB_OFFLINE`` once, at import, into
    these flags, and consult the flags at each request."""
    from huggingface_hub import constants  # lazy: a slow import, needed only for Hub names

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
