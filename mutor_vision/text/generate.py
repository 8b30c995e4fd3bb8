"""Greedy generation with an optional bidirectional prompt prefill (docs/method.md §4).

A model trained with ``prompt_attention: bidirectional`` must read its prompt the same way at
inference: the prefill uses the register core's mask rule (no registers), then decoding is plain
causal with the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from mutor_vision.registers import Offsets, prompt_answer_layout
from mutor_vision.text.adapter import mask_in_form


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_id: int,
    prompt_attention: str = "causal",
    mask_form: str = "bool",
) -> list[int]:
    """Generated token ids (without the prompt), stopping at EOS (included) or the budget."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    q = len(prompt_ids)
    layout = prompt_answer_layout(
        Offsets(torch.ones(1, dtype=torch.long, device=device)),
        torch.tensor([q], device=device),
        torch.zeros(1, dtype=torch.long, device=device),
        prompt_attention=prompt_attention,
    )
    embeds = model.get_input_embeddings()(ids)
    mask = mask_in_form(layout, mask_form, q, embeds.dtype)
    cache = DynamicCache()
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=torch.arange(q, device=device)[None],
        past_key_values=cache,
        use_cache=True,
    )
    generated: list[int] = []
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if token == eos_token_id:
            break
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            position_ids=torch.tensor([[q + step]], device=device),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return generated
