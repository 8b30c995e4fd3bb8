"""Loading LlamaGen / mutor-vision GPT checkpoints strictly, and saving this project's format.

Accepted inputs (docs/compatibility.md §1):
- this project's export: a directory (or its ``model.safetensors``) with ``config.json`` beside, or
  the Hugging Face Hub id of one (``owner/name``: downloaded, or read from the local cache offline);
- any ``.safetensors`` file holding a GPT state dict;
- an official LlamaGen ``.pt``: the raw state dict, or one under ``"model"`` / ``"module"`` /
  ``"state_dict"`` (DDP runs may also hold ``optimizer``, ``steps``, ``args``, ``ema``), keys
  possibly prefixed ``module.`` / ``_orig_mod.``, possibly with ``freqs_cis`` / ``*.kv_cache.*``.

Pickles are opened with ``weights_only=True``. Files that need arbitrary unpickling (LlamaGen's DDP
checkpoints pickle an argparse Namespace) load only with ``trust=True``, with a warning.

An export directory holds ``model.safetensors`` and ``config.json``, and may hold ``tokenizer.json``,
``data.json`` and ``training.json`` (records of the tokenizer, the training data and the run),
``README.md`` (the model card, ``card.py``) and ``llamagen.pt``: the same weights in the form
LlamaGen's own scripts load (``{"model": state dict}``, LlamaGen's keys, no register vector).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mutor_vision.config import from_dict, to_dict
from mutor_vision.errors import ConfigError, InputError, first_line
from mutor_vision.files import atomic_write, atomic_write_json, atomic_write_text, storage_faults
from mutor_vision.hub import is_hub_name, libraries_offline, offline_reason
from mutor_vision.models.config import GPTConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
DATA_NAME = "data.json"
TRAINING_NAME = "training.json"
CARD_NAME = "README.md"
LLAMAGEN_NAME = "llamagen.pt"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME, DATA_NAME, TRAINING_NAME, CARD_NAME)
REGISTER_KEY = "register_embedding"
_CONTAINER_KEYS = ("model", "module", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(InputError):
    """A checkpoint cannot be read or does not match the model; the message says what and where."""


def read_export_config(path: str | Path, overrides: dict[str, Any] | None = None) -> GPTConfig | None:
    """The model config recorded with ``path`` (an export directory, or a file beside its config.json).

    None for a bare weights file (an official LlamaGen ``.pt`` or a lone ``.safetensors``).
    """
    _, config_path = resolve(Path(path))
    if config_path is None:
        return None
    try:
        return from_dict(GPTConfig, {**json.loads(config_path.read_text()), **(overrides or {})})
    except (json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"{config_path}: bad model config: {error}") from None


def save_export(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """An export directory: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``, ``data.json``,
    ``training.json``, ``README.md``), each atomically.

    ``state`` may come from a wrapped or compiled model (keys are normalised). ``tokenizer`` records
    the tokenizer the training tokens were made with (kind, path, checksum), read back by
    :func:`read_export_tokenizer`; ``data`` what the training data held (``num_classes``: its labels
    are ``0 .. num_classes - 1``; ``classes``: their names), read back by :func:`read_export_data`;
    ``training`` the run that made it (its step, steps, batch, ...); ``card`` the model card.
    """
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in normalise_state_dict(state).items()}
    with storage_faults(directory, "cannot write the export"):  # a full disk: exit 5, no partial file
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_json(directory / CONFIG_NAME, to_dict(config))
        for name, record in ((TOKENIZER_NAME, tokenizer), (DATA_NAME, data), (TRAINING_NAME, training)):
            if record is not None:
                atomic_write_json(directory / name, record)
        if card is not None:
            atomic_write_text(directory / CARD_NAME, card)


def save_llamagen(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """The weights as LlamaGen's ``sample_c2i.py`` / ``sample_c2i_ddp.py`` load them: ``torch.save`` of
    ``{"model": state dict}`` with LlamaGen's keys (this project's, less the register vector, which
    LlamaGen has no use for: registers are never inserted at inference)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in normalise_state_dict(state).items() if k != REGISTER_KEY}
    with storage_faults(path.parent, "cannot write the LlamaGen checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"model": state}, tmp))


def locate_checkpoint(name: str | Path) -> Path:
    """``name`` as a local path, or for a Hugging Face Hub id (``owner/name``) of an export its snapshot
    in the local cache: downloaded when the Hub can be reached, else read from the cache. Decided in
    seconds (``mutor_vision/hub.py``); one :class:`CheckpointError` naming the id and the cache folder
    when it can be had neither way."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_name(str(name)):
        return path
    from huggingface_hub import constants, snapshot_download  # lazy: a slow import, needed only for Hub ids

    reason = offline_reason()
    try:
        with libraries_offline() if reason else contextlib.nullcontext():
            folder = snapshot_download(str(name), allow_patterns=list(EXPORT_FILES), local_files_only=bool(reason))
    except Exception as error:  # the hub's own kinds: not found, not cached, gated, a connection lost
        what = f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}" if reason else (
            f"not a readable Hub export ({first_line(error)}; cache: {constants.HF_HUB_CACHE})"
        )  # fmt: skip
        raise CheckpointError(f"{name}: no such file or directory, and as a Hugging Face Hub id {what}") from None
    return Path(folder)


def read_export_tokenizer(path: str | Path) -> dict[str, Any]:
    """The tokenizer record of an export directory ({} when there is none, e.g. an official file)."""
    return _read_record(path, TOKENIZER_NAME)


def read_export_data(path: str | Path) -> dict[str, Any]:
    """The training-data record of an export directory ({} when there is none: older exports, official files)."""
    return _read_record(path, DATA_NAME)


def read_export_training(path: str | Path) -> dict[str, Any]:
    """The record of the run that made an export ({} when there is none: older exports, official files)."""
    return _read_record(path, TRAINING_NAME)


def _read_record(path: str | Path, name: str) -> dict[str, Any]:
    record = Path(path) / name
    if not Path(path).is_dir() or not record.is_file():
        return {}
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{record}: not valid JSON ({error})") from None


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a GPT state dict from any accepted container, normalised to this project's key names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            raw: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        raw = _torch_load(path, trust)
    return normalise_state_dict(_unwrap_container(raw, path), path)


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needs_globals = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if needs_globals is None:  # not a refused class: the bytes themselves are broken
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt pickle stream)") from None
        if not trust:
            raise CheckpointError(
                f"{path}: the file pickles {needs_globals.group(1)}, which only arbitrary unpickling can load. "
                "Unpickling can run code: if you trust this file, pass trust=True "
                "(--trust-checkpoint on the command line), or convert it once to safetensors."
            ) from None
        warnings.warn(f"{path}: unpickling with weights_only=False because trust=True", stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # the legacy unpickler raises anything (KeyError for a text file)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def _unwrap_container(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict holding one, got {type(raw).__name__}")
    for key in _CONTAINER_KEYS:
        if key in raw and isinstance(raw[key], dict):
            return raw[key]
    if any(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw
    raise CheckpointError(f"{path}: no state dict found (top-level keys: {sorted(raw)[:10]})")


def normalise_state_dict(state: dict[str, Any], source: str | Path = "<state dict>") -> dict[str, torch.Tensor]:
    """Strip ``module.`` / ``_orig_mod.`` prefixes; drop ``freqs_cis`` and KV-cache entries."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
            key = key.replace("." + prefix, ".")
        if key == "freqs_cis" or key.endswith(".freqs_cis") or ".kv_cache." in key:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Copy ``state`` into ``model``; any missing, unexpected or mis-shaped key is one clear error.

    Only the register vector may be missing (official LlamaGen files): it keeps its fresh init.
    """
    title = f"{source} does not match the model (config: {_describe(model)})"
    check_state_dict(model.state_dict(), state, title, optional={REGISTER_KEY})
    model.load_state_dict(state, strict=False)
    if REGISTER_KEY not in state:
        log.warning("%s has no %s (an official LlamaGen file): initialised N(0, 0.02)", source, REGISTER_KEY)


def check_state_dict(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], title: str, optional: set[str] = frozenset()
) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{title}:"]
        for heading, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {heading} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def _describe(model: nn.Module) -> str:
    c = model.config
    return (
        f"size={c.size} n_layer={c.n_layer} n_head={c.n_head} dim={c.dim} vocab={c.vocab_size} classes={c.num_classes}"
    )


def resolve(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a directory or a file."""
    if path.is_dir():
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
        missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (path / name).is_file()]
        if missing:  # an export directory always holds both; never guess an architecture for it
            raise CheckpointError(
                f"{path}: not an export directory ({' and '.join(missing)} missing; an export holds "
                f"{WEIGHTS_NAME} and {CONFIG_NAME}). For a bare weights file, pass the file itself."
            )
        return weights, config
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    config = path.parent / CONFIG_NAME
    return path, config if path.suffix == ".safetensors" and config.is_file() else None
