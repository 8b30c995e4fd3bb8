"""One evaluation's settings, :class:`EvalConfig`: the one source of the settings stamp, of the defaults
an older stamp gets, and of the settings ``results.json`` records.

The fields marked ``STAMPED`` decide the images: they are written to ``sampling_settings.json``
beside the samples, and a rerun into the same folder must match them (``files.check_stamp``). A
stamp of older code lacks the keys added since; those count as their default here, which is what
the older code did. The other fields say how the run goes and may change between reruns.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mutor_vision.config import check, default_values, to_dict
from mutor_vision.errors import ConfigError
from mutor_vision.models import GPT, SamplingConfig
from mutor_vision.processes import DEFAULT_COLLECTIVE_TIMEOUT_S

STAMPED = {"stamped": True}


@dataclass
class EvalConfig:
    """What an evaluation samples and how. The defaults are the paper's FID protocol — 50,000 samples,
    CFG 2.0 on logits, temperature 1.0, no top-k or top-p — and, where the paper is silent, LlamaGen's
    ``sample_c2i_ddp.py``: labels uniform at random (``per_class`` draws i % classes instead)."""

    out_dir: Path  # samples/, samples.npz, labels.npy, grid.png, results.json; held by one run at a time
    num_samples: int = field(default=50_000, metadata=STAMPED)
    per_class: bool = field(default=False, metadata=STAMPED)  # labels i % classes; False: uniform at random
    num_classes: int | None = field(default=None, metadata=STAMPED)  # classes 0..n-1; None: all the model's
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0), metadata=STAMPED)
    draft_tokens: int = field(default=1, metadata=STAMPED)  # k > 1: register drafting (docs/drafting.md)
    decode_precision: str = field(default="fp32", metadata=STAMPED)  # what `decode` computes in: it changes pixels
    batch_size: int = 64  # images per sampling batch, per rank
    feature_batch_size: int = 64  # images per feature-extractor batch
    save_npz: bool = True  # write ADM's samples.npz
    compile: bool = False  # the CUDA-graph decode (CUDA only; ignored on the CPU)
    device: str = "auto"  # auto: CUDA when available; cpu
    overlap: bool | None = None  # measure batch i while batch i + 1 samples; None: on CUDA (run.py)
    # seconds a collective waits for a rank that does not come
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    notes: dict[str, Any] = field(default_factory=dict)  # the caller's entries for results.json

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.num_classes is None or self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        check(self.draft_tokens >= 1, "draft_tokens", f"must be >= 1, got {self.draft_tokens}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.feature_batch_size >= 1, "feature_batch_size", f"must be >= 1, got {self.feature_batch_size}")
        check(self.device in ("auto", "cpu"), "device", f"must be auto or cpu, got {self.device!r}")

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes)

    def for_model(self, model: GPT) -> EvalConfig:
        """This config with ``num_classes`` resolved against the model (None: all its classes)."""
        classes = model.config.num_classes
        if self.num_classes is None:
            return self.replace(num_classes=classes)
        if self.num_classes > classes:
            raise ConfigError(f"num_classes {self.num_classes}: the model has classes 0..{classes - 1}")
        return self

    def stamp(self, model: GPT) -> dict[str, Any]:
        """The settings stamp: every STAMPED field (the sampling keys at the top level), then the model's
        config and a fingerprint of its weights. Call on :meth:`for_model`'s config."""
        stamp = _flat({f.name: getattr(self, f.name) for f in _stamped()})
        stamp["model"] = {"config": to_dict(model.config), "checksum": weights_checksum(model)}
        return stamp

    @classmethod
    def stamp_defaults(cls, model: GPT) -> dict[str, Any]:
        """Dotted key -> the value a stamp without that key (older code) stands for."""
        defaults = {f"model.config.{key}": value for key, value in default_values(type(model.config)).items()}
        defaults.update(_flat({f.name: _default(f) for f in _stamped()}))
        defaults["num_classes"] = model.config.num_classes  # before the key: every class of the model
        return defaults

    def record(self) -> dict[str, Any]:
        """The settings results.json records (call on :meth:`for_model`'s config)."""
        sampling = {
            **dataclasses.asdict(self.sampling),
            "labels": "per-class" if self.per_class else "random",
            "batch_size": self.batch_size,
            "num_classes": self.num_classes,
        }
        return {"num_samples": self.num_samples, "sampling": sampling, "decode_precision": self.decode_precision}


def _stamped() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EvalConfig) if f.metadata.get("stamped")]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """A nested settings dataclass (the sampling) spread into its keys."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        flat.update(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {name: value})
    return flat


def weights_checksum(model: nn.Module) -> str:
    """A cheap fingerprint of the weights (sum and first elements of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().float().flatten()
        digest.update(f"{name}:{flat.sum().item():.6e}:{flat[:4].tolist()}".encode())
    return digest.hexdigest()[:16]
