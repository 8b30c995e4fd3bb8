"""Greedy generation for evaluation: batched prompts, the training prompt rule, a KV cache, EOS per row,
and optionally register drafting.

A model trained with ``prompt_attention: bidirectional`` must read its prompt the same way at
inference, so the prefill uses the register core's rule (right-padded prompts, each read causally
or bidirectionally, padding never attended). Each later round feeds one pending token per row at a
shared cache index; a row's keys are its own prompt and its own tokens, and its position ids
continue from its prompt length, so a row's output does not depend on the other rows of its batch.

With ``draft_tokens = k > 1`` the trained register vector drafts ``k − 1`` tokens per round: registers
anchored at the last prompt token (in the prefill) or at every fed token (in a round) predict the next
tokens, the round feeds them after the pending token, and the longest prefix equal to the model's own
greedy choice is kept — the output is exactly plain greedy decoding, in fewer forwards when drafts are
right. The round (verify, accept, next drafts) is ``mutor_vision/core/drafting.py``'s :class:`Drafter`,
shared with image sampling; this loop feeds the model and keeps the KV cache, EOS and padding. Registers
and rejected drafts are cut from the KV cache after each forward. ``k = 1`` is plain greedy decoding,
through the same loop. ``stats`` (a :class:`DecodeStats`) adds the forwards and tokens of the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mutor_vision.core.drafting import DecodeStats, Drafter, round_registers
from mutor_vision.core.registers import anchored_layout, step_mask
from mutor_vision.text.adapter import RegisterEmbedding, as_mask_form


@torch.no_grad()
def greedy_generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    prompt_attention: str = "causal",
    mask_form: str = "bool",
    pad_token_id: int = 0,
    registers: RegisterEmbedding | None = None,
    draft_tokens: int = 1,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """The greedy continuation of every prompt (without the prompt), up to and including EOS."""
    from transformers import DynamicCache  # lazy: Hugging Face libraries (the `text` extra) load only where used

    if mask_form not in ("bool", "float"):
        raise ValueError(f"generation takes the sdpa or eager attention implementation (mask form {mask_form!r})")
    if draft_tokens > 1 and registers is None:
        raise ValueError("draft_tokens > 1 needs the trained register vector (registers=...)")
    k, device = draft_tokens, next(model.parameters()).device
    embedding = model.get_input_embeddings()
    dtype = embedding.weight.dtype
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    drafter = Drafter(k)  # greedy
    cache = DynamicCache()

    def forward(embeds: Tensor, allowed: Tensor, positions: Tensor) -> Tensor:
        out = model(
            inputs_embeds=embeds, attention_mask=as_mask_form(allowed, mask_form, dtype), position_ids=positions,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        return out.logits

    def with_registers(embeds: Tensor, count: int) -> Tensor:
        return embeds if count == 0 else torch.cat([embeds, registers(embedding, batch, count, dtype)], dim=1)

    # Prefill: the prompts, and registers anchored at each row's last prompt token (drafts of tokens 2..k).
    prefill = anchored_layout(
        (lengths - 1)[:, None].expand(batch, k - 1), torch.arange(2, k + 1, device=device), lengths, width,
        prefix_len=lengths if prompt_attention == "bidirectional" else None,
    )  # fmt: skip
    positions = torch.cat([torch.arange(width, device=device).expand(batch, -1), prefill.position], dim=1)
    logits = forward(with_registers(embedding(ids), k - 1), prefill.dense_mask(), positions)
    _keep(cache, width)  # the registers' keys and values go: nobody attends to a register
    rows = torch.arange(batch, device=device)
    pending, drafts = drafter.start(logits[rows, lengths - 1], logits[:, width:])  # the first token, then drafts
    keys = torch.arange(width, device=device)[None] < lengths[:, None]  # cache slots holding this row's tokens
    generated, forwards = pending[:, None], 1
    finished = pending == eos_token_id
    while generated.shape[1] < max_new_tokens and not bool(finished.all()):
        cached, done = keys.shape[1], generated.shape[1]
        n = min(k, max_new_tokens - done)  # the pending token and n - 1 drafts
        fed = torch.cat([pending[:, None], drafts.tokens[:, : n - 1]], dim=1)
        fed_positions = (lengths + done - 1)[:, None] + torch.arange(n, device=device)  # (B, n)
        anchor, offset = round_registers(n, k, device)  # the fed index each register follows, its offset
        register_positions = fed_positions[:, anchor] + offset - 1
        allowed = step_mask(cached + n, cached + n, cached + torch.arange(n, device=device), cached + anchor)
        allowed = (
            allowed
            & torch.cat([keys, torch.ones(batch, n + anchor.shape[0], dtype=torch.bool, device=device)], 1)[
                :, None, None
            ]
        )
        logits = forward(
            with_registers(embedding(fed), anchor.shape[0]), allowed, torch.cat([fed_positions, register_positions], 1)
        )
        forwards += 1
        step = drafter.verify(logits[:, :n], logits[:, n:], drafts, finished=finished)  # finished rows: no hold-up
        generated = torch.cat([generated, step.tokens], dim=1)
        _keep(cache, cached + 1 + step.m)  # the pending token and the accepted drafts stay
        keys = torch.cat([keys, torch.ones(batch, 1 + step.m, dtype=torch.bool, device=device)], dim=1)
        pending, drafts = step.tokens[:, -1], step.drafts
        finished |= (generated[:, done:] == eos_token_id).any(dim=1)
    if stats is not None:  # tokens: how far the batch advanced (per row); forwards: the model calls it took
        stats.add(DecodeStats(forwards=forwards, tokens=generated.shape[1]))
    return [_until_eos(row.tolist()[:max_new_tokens], eos_token_id) for row in generated]


def _keep(cache, length: int) -> None:
    """Cut a Hugging Face cache to its first ``length`` positions (transformers 5: crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def greedy_generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int,
    prompt_attention: str = "causal",
    mask_form: str = "bool",
) -> list[int]:
    """One prompt's greedy continuation (a batch of one)."""
    return greedy_generate_batch(model, [prompt_ids], max_new_tokens, eos_token_id, prompt_attention, mask_form)[0]


def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    prompt_attention: str = "causal",
    mask_form: str = "bool",
    batch_size: int = 32,
    show_progress: bool = True,
    registers: RegisterEmbedding | None = None,
    draft_tokens: int = 1,
    stats: DecodeStats | None = None,
) -> list[str]:
    """Decoded greedy continuations of text prompts, ``batch_size`` at a time (similar lengths together)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not show_progress):
        chunk = order[start : start + batch_size]
        outputs = greedy_generate_batch(
            model, [encoded[i] for i in chunk], max_new_tokens, tokenizer.eos_token_id, prompt_attention,
            mask_form, pad, registers, draft_tokens, stats,
        )  # fmt: skip
        for index, tokens in zip(chunk, outputs, strict=True):
            texts[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return texts
