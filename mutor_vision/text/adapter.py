"""MuToR-1D for Hugging Face causal LMs with RoPE position ids (Llama, Gemma, Qwen2, ...).

The register core builds the layout and the mask; this module only meets Hugging Face: it splices
the shared register vector into ``inputs_embeds`` after the regular tokens, passes explicit
``position_ids`` and the 4D mask in the form the model's attention implementation needs
(``sdpa``: bool, ``eager``: additive float, ``flex_attention``: BlockMask), and combines the
losses. Right-padded batches of any size (docs/method.md §4). Its settings are a
:class:`TextRegisterConfig`, the ``registers:`` section of the text config, defaults included.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mutor_vision.core.config import TextRegisterConfig
from mutor_vision.core.loss import LossParts, combined_loss, combined_loss_from_hidden
from mutor_vision.core.registers import (
    IGNORE_INDEX,
    Offsets,
    RegisterLayout,
    num_registers_for_fraction,
    prompt_answer_layout,
    sample_offsets_1d,
)
from mutor_vision.errors import ConfigError

MASK_FORMS = {"sdpa": "bool", "eager": "float", "flex_attention": "block"}


class RegisterEmbedding(nn.Module):
    """The one shared register vector (hidden,), scaled like the model's token embeddings.

    Gemma-style models multiply embeddings by sqrt(hidden) inside the embedding layer (an
    ``embed_scale`` buffer in transformers 5): the register gets the same factor.
    """

    def __init__(self, hidden_size: int, std: float = 0.02) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.randn(hidden_size) * std)

    def forward(self, embedding: nn.Module, batch: int, count: int, dtype: torch.dtype) -> Tensor:
        vector = self.vector.to(dtype)
        scale = getattr(embedding, "embed_scale", None)
        if scale is not None:
            vector = vector * torch.as_tensor(scale).to(device=vector.device, dtype=dtype)
        return vector.expand(batch, count, -1)


class TextOutput(NamedTuple):
    """What the forward returns: the logits, or with ``return_loss`` the training loss's named parts.

    A named tuple, so DDP, FSDP and ``torch.compile`` see every tensor in it."""

    logits: Tensor | None  # (B, L, V): regular positions
    register_logits: Tensor | None  # (B, R, V)
    layout: RegisterLayout
    loss: dict[str, Tensor] | None = None  # loss (backpropagated), loss_ntp, loss_reg: LossParts.named()


class MuToRAdapter(nn.Module):
    """A causal LM plus the register vector; ``forward`` on right-padded prompt + answer rows.

    ``config``: the ``registers:`` section of the text config (default: its defaults, the MuToR
    authors' recipe); ``mode: ntp`` trains plain next-token with the same masks and loss code.
    """

    def __init__(self, model: nn.Module, config: TextRegisterConfig | None = None, head_chunk_size: int = 0) -> None:
        super().__init__()
        config = TextRegisterConfig() if config is None else config
        if config.modality != "text":
            raise ConfigError(
                f"the text adapter takes a TextRegisterConfig (text defaults), got a {type(config).__name__}"
            )
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if implementation not in MASK_FORMS:
            raise ValueError(
                f"attn_implementation {implementation!r} cannot take the register mask: use one of {sorted(MASK_FORMS)}"
            )
        self.model = model
        self.register_config = config
        # The training loss runs the head + CE in chunks where the model's logits are a plain linear
        # map of its last hidden states (no softcapping or scaling to reproduce); else whole logits.
        self.head_chunk_size = head_chunk_size if plain_linear_head(model) else 0
        self.mask_form = MASK_FORMS[implementation]
        hidden, std = model.config.hidden_size, getattr(model.config, "initializer_range", 0.02)
        self.registers = RegisterEmbedding(hidden, std=std)
        # Unused without registers: frozen, so DDP does not wait for its gradient.
        self.registers.requires_grad_(config.enabled)

    @property
    def weight(self) -> float:
        """a in (1 - a)·L_ntp + a·L_reg (``registers.weight``); settable, e.g. to take the parts apart."""
        return self.register_config.weight

    @weight.setter
    def weight(self, value: float) -> None:
        self.register_config = dataclasses.replace(self.register_config, weight=value)

    @property
    def _no_split_modules(self) -> list[str]:
        """The wrapped model's layer classes: FSDP's transformer auto-wrap shards by them."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def layout(
        self, prompt_len: Tensor, answer_len: Tensor, seq_len: int, generator: torch.Generator | None = None
    ) -> RegisterLayout:
        """Registers before answer tokens, d uniform in {1..d_max} per sample (also built for ntp: the mask).

        ``num_registers`` (at most the batch's longest answer) or ``register_fraction`` of the answer
        slots, drawn at random per sample; neither: every answer slot."""
        batch, c = prompt_len.shape[0], self.register_config
        if c.enabled:
            offsets = sample_offsets_1d(batch, c.d_max, generator=generator, device=prompt_len.device)
        else:
            offsets = Offsets(d=torch.ones(batch, dtype=torch.long, device=prompt_len.device))
        num_registers, num_slots = None, max(int(answer_len.max()), 1)
        if c.enabled and c.register_fraction is not None:
            num_registers = num_registers_for_fraction(c.register_fraction, num_slots)
        elif c.enabled and c.num_registers is not None:
            num_registers = min(c.num_registers, num_slots)
        return prompt_answer_layout(
            offsets,
            prompt_len,
            answer_len,
            seq_len=seq_len,
            num_registers=num_registers,
            valid_slots_only=c.valid_slots_only,
            prompt_attention=c.prompt_attention,
            generator=generator,
        )

    def attention_mask(self, layout: RegisterLayout, size: int | None, dtype: torch.dtype):
        """The rule in the attention implementation's form (size = L: regular block only)."""
        return mask_in_form(layout, self.mask_form, size, dtype)

    def forward(
        self,
        input_ids: Tensor,
        prompt_len: Tensor,
        answer_len: Tensor,
        generator: torch.Generator | None = None,
        layout: RegisterLayout | None = None,
        return_loss: bool = False,
    ) -> TextOutput:
        """Logits of the regular positions and the registers; with ``return_loss`` the training loss
        instead, as named parts (``loss``, ``loss_ntp``, ``loss_reg``), the head and CE in chunks of
        ``head_chunk_size`` positions where the model's head allows (a plain linear head: otherwise
        the model's own logits are needed). ``layout`` is drawn here from ``generator`` when not given
        (the trainer draws it outside the forward)."""
        batch, seq_len = input_ids.shape
        layout = layout or self.layout(prompt_len, answer_len, seq_len, generator)
        embedding = self.model.get_input_embeddings()
        embeds = embedding(input_ids)
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, -1)
        registers = self.register_config.enabled
        if registers:
            embeds = torch.cat([embeds, self.registers(embedding, batch, layout.num_registers, embeds.dtype)], dim=1)
            positions = torch.cat([positions, layout.position], dim=1)
        mask = self.attention_mask(layout, None if registers else seq_len, embeds.dtype)
        inputs = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        if return_loss and self.head_chunk_size:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            parts = combined_loss_from_hidden(
                hidden,
                self.model.get_output_embeddings().weight,
                answer_labels(input_ids, prompt_len, answer_len),
                layout.register_labels(input_ids) if registers else None,
                self.weight if registers else 0.0,
                chunk_size=self.head_chunk_size,
                normalization=self.register_config.loss_normalization,
            )
            return TextOutput(None, None, layout, parts.named())
        logits = self.model(**inputs).logits
        output = TextOutput(logits, None, layout)
        if registers:
            output = TextOutput(logits[:, :seq_len], logits[:, seq_len:], layout)
        if return_loss:
            return TextOutput(None, None, layout, self.loss(input_ids, prompt_len, answer_len, output).named())
        return output

    def loss(self, input_ids: Tensor, prompt_len: Tensor, answer_len: Tensor, output: TextOutput) -> LossParts:
        """L_ntp over answer tokens (usual shift), L_reg over valid registers (no shift)."""
        register_labels = None
        if output.register_logits is not None:
            register_labels = output.layout.register_labels(input_ids)
        return combined_loss(
            output.logits,
            answer_labels(input_ids, prompt_len, answer_len),
            output.register_logits,
            register_labels,
            self.weight if output.register_logits is not None else 0.0,
            normalization=self.register_config.loss_normalization,
        )


def plain_linear_head(model: nn.Module) -> bool:
    """Whether the model's logits are its output embedding applied to the decoder's last hidden states,
    nothing else: a bias-free ``nn.Linear`` head, no final softcapping or logit scale (Gemma 2, Cohere)."""
    config = model.config
    head = model.get_output_embeddings()
    scaled = getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
    return type(head) is nn.Linear and head.bias is None and not scaled and hasattr(model, "get_decoder")


def mask_in_form(layout: RegisterLayout, form: str, size: int | None, dtype: torch.dtype):
    """The core's mask as Hugging Face wants it: ``bool`` (sdpa), additive ``float`` (eager) or ``block``."""
    if form == "block":
        return layout.block_mask(size=size)
    return as_mask_form(layout.dense_mask(size=size), form, dtype)


def as_mask_form(allowed: Tensor, form: str, dtype: torch.dtype) -> Tensor:
    """A boolean 4D mask (True = attend) as ``bool`` (sdpa) or additive ``float`` (eager)."""
    if form == "bool":
        return allowed
    # eager adds the mask to the scores: a bool mask would be silently wrong (docs/architecture.md).
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def answer_labels(input_ids: Tensor, prompt_len: Tensor, answer_len: Tensor) -> Tensor:
    """(B, L) next-token labels: position t predicts token t + 1 when that token is in the answer."""
    batch, seq_len = input_ids.shape
    nxt = torch.arange(1, seq_len + 1, device=input_ids.device).expand(batch, -1)
    in_answer = (nxt >= prompt_len[:, None]) & (nxt < (prompt_len + answer_len)[:, None])
    shifted = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return torch.where(in_answer, shifted, torch.full_like(shifted, IGNORE_INDEX))
