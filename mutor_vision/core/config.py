"""The register config, one for images and text: the keys of ``model.registers`` (image training) and
of ``registers`` (text fine-tuning), their defaults per modality, and which keys apply where.

It lives in the core, beside the layout it configures, so that the image model and the text adapter
both import it while ``text`` never reaches ``models``. Like the rest of the core it imports nothing
of the project but ``mutor_vision.errors``: its range checks are its own; ``mutor_vision/config.py``
loads it from YAML and checks the types, as for any config dataclass.

One set of keys and checks, two sets of defaults: :class:`RegisterConfig` has the image defaults
(docs/method.md §3), :class:`TextRegisterConfig` the same keys with the MuToR authors' text defaults
(§4). A key that does not apply to a modality (:data:`ONE_MODALITY`) is accepted at its default only
(a recorded config lists every key and loads back) and otherwise stops the run with one line naming
the key and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mutor_vision.errors import ConfigError

Modality = Literal["image", "text"]

# key -> (the one modality it applies to, why not the other); every other key applies to both.
ONE_MODALITY: dict[str, tuple[Modality, str]] = {
    "d_max_2d": ("image", "MuToR-2D's offsets on the token grid; text registers are 1D: mode mutor1d, d_max"),
    "edge": ("image", "2D targets past the grid's right edge; text has no grid"),
    "register_fraction": ("text", "a fraction of a batch's answer slots; an image gives a count, num_registers"),
    "prompt_attention": ("text", "an image's prompt is its one class token, read causally"),
    "loss_normalization": ("text", "the image loss is the token mean over the batch"),
}
MODES: dict[Modality, tuple[str, ...]] = {"image": ("ntp", "mutor1d", "mutor2d"), "text": ("ntp", "mutor1d")}


def applies(key: str, modality: Modality) -> bool:
    """Whether register key ``key`` means something for ``modality`` (else only its default is accepted)."""
    only = ONE_MODALITY.get(key)
    return only is None or only[0] == modality


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class RegisterConfig:
    """MuToR registers (docs/method.md §3), the image defaults. ``mode: ntp`` trains the plain baseline."""

    modality: ClassVar[Modality] = "image"

    mode: Literal["ntp", "mutor1d", "mutor2d"] = "mutor2d"  # ntp: the next-token baseline, no registers
    d_max: int = 4  # MuToR-1D: d uniform in {1..d_max} per sample
    d_max_2d: int = 4  # MuToR-2D: (d_h, d_w) uniform in {1..D}² \ {(1,1)}
    num_registers: int | None = 80  # R random slots per sample; null = every slot
    valid_slots_only: bool = False  # draw only slots whose target exists
    edge: Literal["wrap", "drop"] = "wrap"  # 2D targets that wrap into the next raster row
    weight: float = 0.5  # a in (1 - a)·L_ntp + a·L_reg
    register_fraction: float | None = None  # text only
    prompt_attention: Literal["causal", "bidirectional"] = "causal"  # text only
    loss_normalization: Literal["token", "sample"] = "token"  # text only

    def __post_init__(self) -> None:
        modes = MODES[self.modality]
        why = "for images only (2D offsets on the token grid); " if self.mode == "mutor2d" else ""
        _check(self.mode in modes, "mode", f"{self.mode!r} is {why}not a {self.modality} mode: {' | '.join(modes)}")
        _check(self.d_max >= 1, "d_max", f"must be >= 1, got {self.d_max}")
        _check(self.d_max_2d >= 2, "d_max_2d", f"must be >= 2, got {self.d_max_2d}")
        _check(self.num_registers is None or self.num_registers >= 1, "num_registers", "must be >= 1 or null")
        _check(0.0 <= self.weight <= 1.0, "weight", f"must be in [0, 1], got {self.weight}")
        frac = self.register_fraction
        _check(frac is None or 0.0 < frac <= 1.0, "register_fraction", f"must be in (0, 1] or null, got {frac}")
        defaults = self.defaults()
        for key, (only, why) in ONE_MODALITY.items():
            value = getattr(self, key)
            _check(
                only == self.modality or value == defaults[key],
                key,
                f"{only} only ({why}); leave it out of the {self.modality} config (got {value!r})",
            )
        _check(
            frac is None or self.num_registers is None,
            "register_fraction",
            f"give num_registers ({self.num_registers}) or register_fraction, not both (the other null)",
        )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key's default for this modality."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @property
    def enabled(self) -> bool:
        return self.mode != "ntp"


@dataclass
class TextRegisterConfig(RegisterConfig):
    """The same keys for text fine-tuning (docs/method.md §4), with the MuToR authors' text defaults."""

    modality: ClassVar[Modality] = "text"

    mode: Literal["ntp", "mutor1d", "mutor2d"] = "mutor1d"  # ntp: plain next-token fine-tuning; mutor2d: images only
    num_registers: int | None = None  # R random answer slots per sample (at most the longest answer's); null = all
    weight: float = 0.3  # a in (1 - a)·L_ntp + a·L_reg
    register_fraction: float | None = None  # sparse registers: this fraction of answer slots; null = all
    prompt_attention: Literal["causal", "bidirectional"] = "bidirectional"  # the paper's setting (causal: any stack)
    loss_normalization: Literal["token", "sample"] = "sample"  # sample: mean of per-sample means (the authors')
