"""The model config (typed, validated) and the LlamaGen size table; the register keys are the core's
(``mutor_vision/core/config.py``, shared with the text adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mutor_vision.config import check
from mutor_vision.core.config import RegisterConfig

__all__ = ["SIZES", "GPTConfig", "RegisterConfig", "ffn_hidden_dim"]

# name -> (n_layer, n_head, dim); docs/compatibility.md §1. head_dim is 64 for every size.
SIZES: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
}


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: int(2·4·dim/3) rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class GPTConfig:
    """A LlamaGen class-conditional GPT. ``size`` fills n_layer/n_head/dim unless given explicitly."""

    size: str | None = "GPT-B"  # GPT-B, GPT-L, GPT-XL, GPT-XXL; null: n_layer, n_head, dim given
    n_layer: int | None = None  # null: from size
    n_head: int | None = None  # null: from size
    dim: int | None = None  # null: from size
    ffn_hidden: int | None = None  # default: ffn_hidden_dim(dim)
    vocab_size: int = 16384  # the tokenizer's codebook size
    num_classes: int = 1000  # class labels; one more row is the null class of CFG
    grid_size: int = 16  # h = w; N = grid_size² image tokens
    rope_base: float = 10000.0  # 2D RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    token_dropout: float = 0.1  # on the input embeddings, registers included
    resid_dropout: float = 0.1  # after the attention output projection
    ffn_dropout: float = 0.1  # after the feed-forward
    class_dropout: float = 0.1  # label -> null class with this probability in training (CFG)
    init_std: float = 0.02  # N(0, std) for Linear and Embedding weights (the head starts at zero)
    attention: Literal["auto", "flex", "sdpa"] = "auto"  # auto: FlexAttention on CUDA, SDPA on CPU
    head_chunk_size: int = 0  # training loss: head + CE over this many positions at a time; 0: whole logits
    registers: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self) -> None:
        if self.size is not None:
            check(self.size in SIZES, "size", f"must be one of {list(SIZES)} or null, got {self.size!r}")
            n_layer, n_head, dim = SIZES[self.size]
            self.n_layer = n_layer if self.n_layer is None else self.n_layer
            self.n_head = n_head if self.n_head is None else self.n_head
            self.dim = dim if self.dim is None else self.dim
        for key in ("n_layer", "n_head", "dim"):
            value = getattr(self, key)
            check(value is not None and value >= 1, key, f"must be a positive integer (or set size), got {value}")
        check(self.dim % self.n_head == 0, "dim", f"{self.dim} is not divisible by n_head {self.n_head}")
        check(self.head_dim % 4 == 0, "dim", f"head_dim {self.head_dim} must be divisible by 4 for 2D RoPE")
        self.ffn_hidden = ffn_hidden_dim(self.dim) if self.ffn_hidden is None else self.ffn_hidden
        check(self.ffn_hidden >= 1, "ffn_hidden", "must be >= 1")
        check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        check(self.num_classes >= 1, "num_classes", "must be >= 1")
        check(self.grid_size >= 1, "grid_size", "must be >= 1")
        check(self.head_chunk_size >= 0, "head_chunk_size", f"must be >= 0 (0: off), got {self.head_chunk_size}")
        for key in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        check(
            self.registers.modality == "image",
            "registers",
            f"a {type(self.registers).__name__} has the {self.registers.modality} defaults; the image model takes a "
            "RegisterConfig",
        )
        if self.registers.enabled and self.registers.mode == "mutor2d":
            check(self.grid_size >= self.registers.d_max_2d, "registers.d_max_2d", "must be <= grid_size")
        if self.registers.enabled and self.registers.num_registers is not None:
            check(
                self.registers.num_registers <= self.num_tokens,
                "registers.num_registers",
                f"{self.registers.num_registers} exceeds grid_size² = {self.num_tokens} slots (null = every slot)",
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def matmul_parameters(self) -> int:
        """Weights used in matrix products: every Linear incl. the head (not the embedding lookups, not norms)."""
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.ffn_hidden  # wqkv + wo, w1 + w3 + w2
        return self.n_layer * per_layer + self.dim * self.vocab_size

    def train_flops_per_sample(self, positions: int) -> float:
        """FLOPs of one training forward + backward over ``positions`` sequence positions (N + R).

        The usual MFU count (PaLM, appendix B): ``6·P·T`` for the weight matmuls (2 forward, 4
        backward per weight and position; P = :meth:`matmul_parameters`) plus ``12·n_layer·dim·T²``
        for the attention products QKᵀ and AV, counted without the causal or register-mask savings.
        For GPT-B with 80 registers (T = 336): 6·97.5M·336 + 12·12·768·336² = 2.09e11 per image.
        """
        return 6.0 * self.matmul_parameters() * positions + 12.0 * self.n_layer * self.dim * positions**2

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2
