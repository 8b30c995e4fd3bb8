"""LlamaGen's class-conditional GPT with MuToR registers.

State-dict compatible with LlamaGen c2i checkpoints (docs/compatibility.md §1) plus one tensor, the shared
``register_embedding`` (dim,). With a register layout from :mod:`mutor_vision.core.registers`, the
forward runs the two-block sequence ``[class, x_1..x_{N-1} | R registers]``; without one it is
LlamaGen's training forward. Sampling uses the static KV cache below (see ``sampling.py``). How it
runs fast (compile, CUDA graphs, FSDP) is applied from outside: ``mutor_vision/parallelize.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from mutor_vision.config import from_dict
from mutor_vision.core.loss import combined_loss_from_hidden
from mutor_vision.core.registers import RegisterLayout, grid_layout, sample_offsets_1d, sample_offsets_2d, step_mask
from mutor_vision.models import checkpoint
from mutor_vision.models.config import GPTConfig
from mutor_vision.models.decode import decode_mask
from mutor_vision.models.rope import apply_rope, rope_2d_table
from mutor_vision.parallelize import compiled_flex_attention

log = logging.getLogger(__name__)

# Masked SDPA on CUDA avoids cuDNN (wrong output with some masks, NaN grad_q at seq_len % 128 == 64:
# docs/architecture.md); flash refuses masks anyway.
_MASKED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class RegisterRows:
    """Split attention for layouts whose regular rows are plain causal (docs/method.md §2, consequence 3).

    The L regular queries run the fastest causal kernel over the regular keys; only the R register
    queries use the rule's mask rows (B, 1, R, L+R). Equal to the full dense mask, but cheaper.
    """

    seq_len: int
    rows: Tensor


# None = plain causal; a dense bool mask (True = attend); a FlexAttention BlockMask; split rows.
AttentionMask = Tensor | BlockMask | RegisterRows | None


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Attention of q over k, v (B, H, T, D) under ``mask`` (:data:`AttentionMask`)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, BlockMask):
        if not q.is_cuda and torch.compiler.is_compiling():
            # Inductor's CPU flex template wants q in a 4-D buffer of its own, not a view of RoPE's 5-D one.
            q = q.contiguous(memory_format=torch.channels_last)
        # Inside a compiled forward the surrounding graph compiles flex itself; eager CUDA calls use
        # the one compiled flex; CPU eager runs the reference implementation.
        eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
        flex = compiled_flex_attention() if eager_cuda else flex_attention
        return flex(q, k, v, block_mask=mask)
    if isinstance(mask, RegisterRows):
        n = mask.seq_len
        regular = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)
        return torch.cat([regular, _masked_sdpa(q[:, :, n:], k, v, mask.rows)], dim=2)
    return _masked_sdpa(q, k, v, mask)


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    if q.is_cuda:
        with sdpa_kernel(_MASKED_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GPTOutput(NamedTuple):
    """What the forward returns: the logits, or with ``return_loss`` the training loss's named parts.

    A named tuple, so DDP, FSDP and ``torch.compile`` see every tensor in it."""

    logits: Tensor | None = None  # (B, N, V) float32: logits[:, t] predicts tokens[:, t]
    register_logits: Tensor | None = None  # (B, R, V) float32, with a register layout
    loss: dict[str, Tensor] | None = None  # loss (backpropagated), loss_ntp, loss_reg: LossParts.named()


class KVCache(nn.Module):
    """Preallocated static cache (B, H, max_len, D) for one layer."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # rows: q | k | v
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, input_pos: Tensor | None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = (t.view(batch, length, self.n_head, self.head_dim).transpose(1, 2) for t in self.wqkv(x).chunk(3, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            cached = input_pos.shape[0]
            k_all, v_all = self.kv_cache.update(input_pos, k[:, :, :cached], v[:, :, :cached])
            if cached < length:  # registers after the cached tokens: attended by themselves only, never kept
                k_all, v_all = torch.cat([k_all, k[:, :, cached:]], dim=2), torch.cat([v_all, v[:, :, cached:]], dim=2)
            k, v = k_all, v_all
        out = attend(q, k, v, mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, length, dim)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x); w1 = gate, w3 = up, w2 = down (LlamaGen's key names)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, input_pos: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """Class table with a null row (index num_classes) for CFG; labels dropped to it in training."""

    def __init__(self, num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.cls_embedding = ClassEmbedding(config.num_classes, config.dim, config.class_dropout)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # MuToR's one shared register. Frozen when registers are off: an unused trainable parameter
        # makes DDP (find_unused_parameters=False) fail at the second step.
        self.register_embedding = nn.Parameter(torch.empty(config.dim), requires_grad=config.registers.enabled)
        cos, sin = rope_2d_table(config.grid_size, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1 + N, head_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's init: Linear and Embedding N(0, std), zero head; the register like an embedding."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)
        nn.init.normal_(self.register_embedding, std=std)

    # ---- training forward ----

    def forward(
        self,
        tokens: Tensor,
        labels: Tensor,
        layout: RegisterLayout | None = None,
        mask: AttentionMask = None,
        return_loss: bool = False,
    ) -> GPTOutput:
        """tokens (B, N) codes x_1..x_N, labels (B,) -> logits (B, N, V) (+ register logits (B, R, V)).

        ``mask`` is :meth:`attention_mask` of ``layout``, built here when not given. A compiled
        training step builds it outside the compiled forward (BlockMask creation does not trace).
        ``return_loss``: the training loss instead of the logits, as named parts (``loss``,
        ``loss_ntp``, ``loss_reg``), computed inside the forward (where FSDP has the head weight
        gathered); with ``config.head_chunk_size`` the head and CE run in chunks, the logits never whole.
        """
        batch, num_tokens = tokens.shape
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(tokens[:, :-1])], dim=1)
        positions = torch.arange(num_tokens, device=tokens.device)
        if layout is not None:
            if layout.seq_len != num_tokens:
                raise ValueError(f"register layout is for {layout.seq_len} tokens, the batch has {num_tokens}")
            if mask is None:
                mask = self.attention_mask(layout, requires_grad=torch.is_grad_enabled())
            registers = self.register_embedding.to(x.dtype).expand(batch, layout.num_registers, -1)
            x = torch.cat([x, registers], dim=1)
            positions = torch.cat([positions.expand(batch, -1), layout.position], dim=1)
        x = self.tok_dropout(x)  # registers go through the same token dropout
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if positions.dim() == 2:  # per-sample positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, None)
        x = self.norm(x)
        if return_loss:
            # Sequence index 0 is the class token: the register targets index tokens shifted by one.
            register_labels = None if layout is None else layout.register_labels(F.pad(tokens, (1, 0)))
            weight, chunk = self.config.registers.weight, self.config.head_chunk_size
            parts = combined_loss_from_hidden(x, self.output.weight, tokens, register_labels, weight, chunk)
            return GPTOutput(loss=parts.named())
        # Split before the head: slicing (B, T, dim) is cheap, slicing (B, T, V) logits is not.
        logits = self.output(x[:, :num_tokens]).float()
        return GPTOutput(logits, None if layout is None else self.output(x[:, num_tokens:]).float())

    def attention_mask(self, layout: RegisterLayout, requires_grad: bool = True) -> AttentionMask:
        """The attention mask of ``[regular | registers]`` for ``layout``, on the layout's device.

        ``attention: auto`` is FlexAttention's BlockMask on CUDA and SDPA with the rule's dense rows
        on CPU (where flex has no backward, so ``requires_grad`` with flex on CPU is an error).
        """
        on_cuda = layout.anchor.is_cuda
        backend = self.config.attention
        if backend == "auto":
            backend = "flex" if on_cuda else "sdpa"
        if backend == "sdpa":
            if layout.regular_causal:
                return RegisterRows(layout.seq_len, layout.dense_mask(first_query=layout.seq_len))
            return layout.dense_mask()
        if not on_cuda and requires_grad:
            raise RuntimeError("attention: flex has no backward on CPU; use attention: sdpa (or auto) for CPU training")
        return layout.block_mask(compile=on_cuda)

    def register_layout(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> RegisterLayout | None:
        """A fresh random register layout for one batch, per ``config.registers`` (None for next-token).

        Built where ``generator`` draws (the host for a CPU generator, the default) and moved to
        ``device`` once, without blocking: a training step never waits here for the GPU.
        """
        reg, grid = self.config.registers, self.config.grid_size
        if not reg.enabled:
            return None
        if reg.mode == "mutor2d":
            offsets = sample_offsets_2d(batch_size, reg.d_max_2d, grid, generator=generator)
        else:
            offsets = sample_offsets_1d(batch_size, reg.d_max, generator=generator)
        layout = grid_layout(
            offsets,
            grid,
            grid,
            num_registers=reg.num_registers,
            valid_slots_only=reg.valid_slots_only,
            edge=reg.edge,
            generator=generator,
        )
        return layout if device is None else layout.to(device)

    # ---- KV-cache inference ----

    def setup_caches(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """A static KV cache for ``batch_size`` rows and the full sequence (N positions).

        A cache of the same shape, dtype and device is reused as it is: a captured CUDA graph keeps
        pointing at the same memory. Stale entries need no clearing, since a query at position t
        only attends to positions <= t, all written before it.
        """
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        shape = (batch_size, self.config.n_head, self.config.num_tokens, self.config.head_dim)
        current = self.layers[0].attention.kv_cache
        if current is not None and current.k.shape == shape and current.k.dtype == dtype and current.k.device == device:
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(*shape, dtype, device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def prefill(self, labels: Tensor) -> Tensor:
        """Class tokens at position 0 -> logits (B, V) for x_1. Needs :meth:`setup_caches`."""
        return self._cached_forward(
            self.cls_embedding(labels)[:, None], torch.zeros(1, dtype=torch.long, device=labels.device)
        )

    def decode(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (B, 1) at sequence position ``input_pos`` (1,) -> logits (B, V) for the next token.

        Attends over the cache with SDPA eager and FlexAttention compiled (``decode.py``). Needs
        :meth:`setup_caches`.
        """
        return self._cached_forward(self.tok_embeddings(tokens), input_pos)

    def extend(
        self, x: Tensor, input_pos: Tensor, register_anchor: Tensor, register_position: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Regular embeddings x (B, n, dim) at positions ``input_pos`` (n,) -> their logits (B, n, V), plus
        registers anchored at ``register_anchor`` (R,) with RoPE rows ``register_position`` (R,) -> (B, R, V).

        The regular tokens join the KV cache (what they attend to is the cache below them and
        themselves); the registers follow the rule of ``mutor_vision/core/registers.py`` — each sees the
        regular sequence up to its anchor and itself — and are never cached, so they change no
        regular logit. Register drafting (``sampling.py``) uses this; needs :meth:`setup_caches`.
        """
        n, count = input_pos.shape[0], register_anchor.shape[0]
        registers = self.register_embedding.to(x.dtype).expand(x.shape[0], count, -1)
        x = torch.cat([x, registers], dim=1)
        # Cache slots past the last fed position hold stale tokens: the rule never lets them be seen.
        mask = step_mask(self.config.num_tokens, int(input_pos[-1]) + 1, input_pos, register_anchor)
        positions = torch.cat([input_pos, register_position])
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        logits = self.output(self.norm(x)).float()
        return logits[:, :n], logits[:, n:]

    def _cached_forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        input_pos = input_pos.to(x.device)  # a no-op in generate(), which keeps positions on the device
        mask = decode_mask(input_pos, self.config.num_tokens)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x[:, -1])).float()

    # ---- checkpoints ----

    @classmethod
    def from_pretrained(cls, path: str | Path, size: str | None = "GPT-B", trust: bool = False, **overrides) -> GPT:
        """Load an official LlamaGen c2i checkpoint or this project's export, strictly.

        ``path``: a file, an export directory, or the Hugging Face Hub id of an export (downloaded,
        or read from the local cache when offline). An export brings its config (``size`` is then
        ignored); for an official file ``size`` (or ``overrides`` with ``size=None``) gives the
        architecture. ``overrides`` patch the config. A missing register vector (official files) is
        initialised and logged. Accepted containers: ``mutor_vision/models/checkpoint.py``.
        """
        path = checkpoint.locate_checkpoint(path)
        config = checkpoint.read_export_config(path, overrides)
        if config is None:
            config = GPTConfig(size=size, **overrides) if size is not None else from_dict(GPTConfig, overrides)
        weights, _ = checkpoint.resolve(path)
        model = cls(config)
        checkpoint.load_state_dict_strict(model, checkpoint.read_state_dict(weights, trust=trust), source=str(weights))
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write an export: ``model.safetensors`` + ``config.json`` (each atomically)."""
        checkpoint.save_export(directory, self.state_dict(), self.config)

    def save_llamagen(self, path: str | Path) -> None:
        """Write the weights as LlamaGen's own scripts load them (``checkpoint.save_llamagen``)."""
        checkpoint.save_llamagen(path, self.state_dict())

    def num_parameters(self, include_register: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total if include_register else total - self.register_embedding.numel()
