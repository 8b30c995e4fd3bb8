"""Greedy generation for evaluation: batched prompts, the training prompt rule, a KV cache, EOS per row.

A model trained with ``prompt_attention: bidirectional`` must read its prompt the same way at
inference, so the prefill uses the register core's rule (``prompt_answer_layout`` without
registers): right-padded prompts, each read causally or bidirectionally, padding never attended.
Decoding then appends one token per row per step at a shared cache index; each row's keys are its
own prompt and its own tokens, and its position ids continue from its prompt length, so a row's
output does not depend on the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mutor_vision.registers import Offsets, prompt_answer_layout
from mutor_vision.text.adapter import as_mask_form


@torch.no_grad()
def greedy_generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    prompt_attention: str = "causal",
    mask_form: str = "bool",
    pad_token_id: int = 0,
) -> list[list[int]]:
    """The greedy continuation of every prompt (without the prompt), up to and including EOS."""
    from transformers import DynamicCache

    if mask_form not in ("bool", "float"):
        raise ValueError(f"generation takes the sdpa or eager attention implementation (mask form {mask_form!r})")
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    layout = prompt_answer_layout(
        Offsets(torch.ones(batch, dtype=torch.long, device=device)),
        lengths,
        torch.zeros(batch, dtype=torch.long, device=device),
        seq_len=width,
        prompt_attention=prompt_attention,
    )
    dtype = model.get_input_embeddings().weight.dtype
    positions = torch.arange(width, device=device).expand(batch, -1)
    out = model(
        input_ids=ids,
        attention_mask=as_mask_form(layout.dense_mask(size=width), mask_form, dtype),
        position_ids=positions,
        past_key_values=DynamicCache(),
        use_cache=True,
    )
    rows = torch.arange(batch, device=device)
    token = out.logits[rows, lengths - 1].argmax(dim=-1)  # each row's last prompt position
    keys = torch.arange(width, device=device)[None] < lengths[:, None]  # (B, keys so far): prompt, no padding
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished |= token == eos_token_id
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        keys = torch.cat([keys, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=as_mask_form(keys[:, None, None, :], mask_form, dtype),
            position_ids=(lengths + step)[:, None],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        token = out.logits[:, -1].argmax(dim=-1)
    return [_until_eos(row.tolist(), eos_token_id) for row in generated]


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
) -> list[str]:
    """Decoded greedy continuations of text prompts, ``batch_size`` at a time (longest prompts together)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not show_progress):
        chunk = order[start : start + batch_size]
        outputs = greedy_generate_batch(
            model, [encoded[i] for i in chunk], max_new_tokens, tokenizer.eos_token_id, prompt_attention,
            mask_form, pad,
        )  # fmt: skip
        for index, tokens in zip(chunk, outputs, strict=True):
            texts[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return texts
