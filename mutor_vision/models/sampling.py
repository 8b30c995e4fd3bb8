"""KV-cache sampling with classifier-free guidance (llamagen.md §1, "Sampling").

Registers are never inserted at inference: this is plain LlamaGen sampling. CFG runs the
conditional rows first and the null-class rows second in one batch and guides on logits with a
constant scale: ``uncond + s·(cond − uncond)``; then temperature, top-k, top-p, multinomial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mutor_vision.models.gpt import GPT


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from logits (B, V). temperature 0 is greedy; top_k 0 / top_p 1.0 are off."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guide(logits: Tensor, cfg_scale: float) -> Tensor:
    """Combine a [conditional; null] batch (2B, V) into guided logits (B, V)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def generate(
    model: GPT,
    labels: Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    always_guide: bool = False,
    compile: bool = False,
    use_cache: bool = True,
) -> Tensor:
    """Sample codes (B, h, w) for class ``labels`` (B,).

    The null-class rows run when ``cfg_scale != 1`` (or ``always_guide``, which measures/tests the
    guided path at scale 1). ``use_cache=False`` recomputes the full prefix every step (the slow
    reference path). ``compile`` compiles the one-token decode step.
    """
    was_training = model.training
    model.eval()
    config = model.config
    batch, num_tokens = labels.shape[0], config.num_tokens
    guided = always_guide or cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, config.num_classes)]) if guided else labels
    codes = torch.zeros(batch, num_tokens, dtype=torch.long, device=labels.device)

    def pick(logits: Tensor) -> Tensor:
        return sample_logits(guide(logits, cfg_scale) if guided else logits, temperature, top_k, top_p, generator)

    try:
        if use_cache:
            model.setup_caches(rows.shape[0])
            decode: Callable[[Tensor, Tensor], Tensor] = model.decode
            if compile:
                decode = torch.compile(model.decode, fullgraph=True, dynamic=False)
            positions = torch.arange(num_tokens, device=labels.device)  # no host-to-device copy per step
            logits = model.prefill(rows)
            for t in range(num_tokens):
                codes[:, t] = pick(logits)
                if t + 1 < num_tokens:
                    step = torch.cat([codes[:, t], codes[:, t]]) if guided else codes[:, t]
                    logits = decode(step[:, None], positions[t + 1 : t + 2])
        else:
            prefix = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=labels.device)
            for t in range(num_tokens):
                # Full forward over [class, x_1..x_t]: its last logits predict x_{t+1}.
                codes[:, t] = pick(model(prefix, rows).logits[:, -1])
                step = torch.cat([codes[:, t], codes[:, t]]) if guided else codes[:, t]
                prefix = torch.cat([prefix[:, :t], step[:, None], prefix[:, t:]], dim=1)
    finally:
        model.clear_caches()
        model.train(was_training)
    return codes.view(batch, config.grid_size, config.grid_size)
