"""What every benchmark records with its numbers: the machine, torch, the device and the command."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def provenance(benchmark: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """The header of a results file: benchmark name, machine, torch, device, the exact command."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    script = Path(sys.argv[0])
    command = f"python bench/{script.name} " + " ".join(sys.argv[1:])
    return {
        "benchmark": benchmark,
        "machine": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": name,
        "command": command.strip(),
    }


def save(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` (nothing when None)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
