"""The text export, written and read here only: ``train_sft.py`` writes it, ``eval/gsm8k.py`` reads it.

Layout of ``<checkpoint>/export/``::

    model/                  the fine-tuned model (or only its LoRA adapter) + tokenizer, Hugging Face format
    registers.safetensors   the register vector ("vector": (hidden,))
    mutor_text.json         base model, LoRA flag, attention implementation, prompt template, and the
                            text keys of ``registers:`` (mode, d_max, weight, ...) at its top level

Exports of older versions recorded ``name: ntp | mutor`` for ``mode``; :func:`read_text_info` reads
them under today's names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mutor_vision.core.config import TextRegisterConfig, applies
from mutor_vision.errors import InputError
from mutor_vision.files import atomic_write, atomic_write_json

INFO = "mutor_text.json"
REGISTERS = "registers.safetensors"
MODEL = "model"
OLD_MODE = {"mutor": "mutor1d", "ntp": "ntp"}  # an older export's "name" -> "mode"


def registers_info(config: TextRegisterConfig) -> dict[str, Any]:
    """The register settings an export records: the keys that apply to text, as in the config."""
    return {key: value for key, value in dataclasses.asdict(config).items() if applies(key, "text")}


def write_text_export(
    directory: Path,
    model,
    tokenizer,
    register_vector: torch.Tensor,
    info: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the export; ``state_dict`` (gathered from all ranks) replaces the model's own when given."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / MODEL, state_dict=state_dict)  # a peft model saves only its adapter
    tokenizer.save_pretrained(directory / MODEL)
    vector = {"vector": register_vector.detach().float().cpu().contiguous()}
    atomic_write(directory / REGISTERS, lambda tmp: save_file(vector, tmp))
    atomic_write_json(directory / INFO, info)


def read_text_info(path: Path) -> dict[str, Any] | None:
    """The export's ``mutor_text.json``, or None for a plain Hugging Face model directory."""
    info = Path(path) / INFO
    if not info.is_file():
        return None
    try:
        recorded = json.loads(info.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{info}: not valid JSON ({error})") from None
    if isinstance(recorded, dict) and "name" in recorded and "mode" not in recorded:  # an older export
        name = recorded.pop("name")
        recorded["mode"] = OLD_MODE.get(name, name)
    return recorded


def model_directory(path: Path, info: dict[str, Any] | None) -> Path:
    """Where the Hugging Face files are: ``<export>/model``, or ``path`` itself for a plain model."""
    return Path(path) / MODEL if info is not None else Path(path)


def read_register_vector(path: Path) -> torch.Tensor:
    """The trained register vector of an export (hidden,)."""
    file = Path(path) / REGISTERS
    if not file.is_file():
        raise InputError(f"{path}: no {REGISTERS} (not a train_sft.py export: nothing to draft with)")
    return load_file(file)["vector"]
