"""The MuToR register layout: offsets, slots, (anchor, target, position) triples, the mask rule.

Modality-agnostic by construction: the image model (class-prefixed raster grid) and the text
adapter (prompt + answer with right padding) both build a :class:`RegisterLayout` here and never
re-derive the rule. See ``docs/method.md`` §2 for the two-block layout::

    [ L regular tokens (causal, untouched by registers) | R registers ]

Index spaces. ``anchor``, ``target`` and ``position`` all index the regular sequence: index ``i``
is the i-th token of the sequence the model reads (for images: 0 = class token, k = x_k). A
register anchored at ``a`` with offset ``d`` predicts the token at index ``a + d`` and sits at
position ``a + d - 1`` (the position whose own next-token target is that token). The target may
lie one past the model input (x_N for images), which is why labels are gathered from the full
id sequence with :meth:`RegisterLayout.register_labels`. The loss over the two blocks is ``loss.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

from mutor_vision.core.device import generator_device, to_device

EdgePolicy = Literal["wrap", "drop"]
PromptAttention = Literal["causal", "bidirectional"]
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Offsets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offsets:
    """One offset per sample. ``d`` is the raster offset; ``rows``/``cols`` are the 2D parts.

    For 2D offsets the target sits ``rows`` rows below and ``cols`` columns right of the anchor
    cell (``rows = d_h - 1``, ``cols = d_w - 1``); 1D offsets have ``rows = cols = None``.
    ``max_cols`` is a bound on ``cols`` known on the host, so checking it never waits for a GPU.
    """

    d: Tensor  # (B,) long, >= 1
    rows: Tensor | None = None  # (B,) long, d_h - 1
    cols: Tensor | None = None  # (B,) long, d_w - 1
    max_cols: int | None = None  # an upper bound on cols (None: read from the tensor)

    @property
    def batch_size(self) -> int:
        return self.d.shape[0]


def sample_offsets_1d(
    batch_size: int,
    d_max: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Offsets:
    """Draw ``d`` uniformly from {1..d_max}, once per sample."""
    if d_max < 1:
        raise ValueError(f"d_max must be >= 1, got {d_max}")
    d = torch.randint(1, d_max + 1, (batch_size,), generator=generator, device=generator_device(generator))
    return Offsets(d=d.to(device))


def sample_offsets_2d(
    batch_size: int,
    d_max_2d: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Offsets:
    """Draw ``(d_h, d_w)`` uniformly from {1..D}² minus (1, 1); ``d = (d_h-1)·width + (d_w-1)``."""
    if d_max_2d < 2:
        raise ValueError(f"d_max_2d must be >= 2 (D = 1 leaves no 2D offset), got {d_max_2d}")
    if width < d_max_2d:
        raise ValueError(f"width ({width}) must be >= d_max_2d ({d_max_2d})")
    # D² - 1 pairs; index k + 1 enumerates (d_h - 1, d_w - 1) in raster order, skipping (0, 0).
    k = torch.randint(0, d_max_2d**2 - 1, (batch_size,), generator=generator, device=generator_device(generator))
    rows, cols = torch.div(k + 1, d_max_2d, rounding_mode="floor"), (k + 1) % d_max_2d
    d = rows * width + cols
    return Offsets(d=d.to(device), rows=rows.to(device), cols=cols.to(device), max_cols=d_max_2d - 1)


def offsets_2d_support(d_max_2d: int, width: int) -> list[int]:
    """The sorted set of raster offsets that :func:`sample_offsets_2d` can return."""
    return sorted(r * width + c for r in range(d_max_2d) for c in range(d_max_2d) if (r, c) != (0, 0))


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterLayout:
    """Where the R registers of each sample go, and what they predict. All tensors (B, R) or (B,).

    ``valid`` is False for registers whose target does not exist (past the end, dropped at the
    grid edge, or a padding slot). An invalid register carries no loss and nobody attends to it;
    its ``position`` is set to its anchor so any RoPE table covers it.
    """

    anchor: Tensor  # (B, R) long: regular index the register follows
    target: Tensor  # (B, R) long: regular index of the token it predicts (anchor + d)
    position: Tensor  # (B, R) long: RoPE row / position id (anchor + d - 1 when valid)
    valid: Tensor  # (B, R) bool
    offset: Tensor  # (B,) long: the sample's d; (B, R), one per register, from anchored_layout
    seq_len: int  # L: regular tokens in the model input
    length: Tensor  # (B,) long: non-padded regular tokens per sample (padding is never attended)
    prefix_len: Tensor  # (B,) long: bidirectional prompt block (0 = plain causal)
    regular_causal: bool = False  # True when no padding and no prompt block: regular rows are plain causal

    @property
    def num_registers(self) -> int:
        return self.anchor.shape[1]

    @property
    def total_len(self) -> int:
        """L + R: the length of the two-block sequence."""
        return self.seq_len + self.num_registers

    def to(self, device: torch.device | str) -> RegisterLayout:
        """This layout on ``device``. From CPU to CUDA the copies go through pinned memory without
        blocking, so a layout built on the host never makes it wait for the GPU's queued work."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: to_device(v, device) for name, v in values.items() if isinstance(v, Tensor)})

    def register_labels(self, sequence_ids: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """(B, R) labels gathered from ``sequence_ids`` (B, >= max valid target + 1); ignore where invalid."""
        index = torch.where(self.valid, self.target, torch.zeros_like(self.target))
        labels = sequence_ids.gather(1, index)
        return torch.where(self.valid, labels, torch.full_like(labels, ignore_index))

    # ---- the mask rule, in its three forms ----

    def _rule_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-query horizon (B, L+R): the last regular key a query may see (itself, or its anchor)."""
        batch = self.anchor.shape[0]
        regular = torch.arange(self.seq_len, device=self.anchor.device).expand(batch, -1)
        horizon = torch.cat([regular, self.anchor], dim=1)
        return horizon, self.length, self.prefix_len

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """A FlexAttention ``mask_mod(b, h, q, kv)`` over this layout (True = may attend)."""
        horizon, length, prefix_len = self._rule_tensors()
        seq_len = self.seq_len

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return register_mask_rule(b, q, kv, horizon, length, prefix_len, seq_len)

        return mask_mod

    def dense_mask(self, first_query: int = 0, size: int | None = None) -> Tensor:
        """The same rule as a dense boolean mask (B, 1, L+R, L+R) for SDPA (True = attend).

        ``first_query = L`` gives only the register rows (B, 1, R, L+R): when ``regular_causal``
        holds, the regular rows are plain causal and can run on the fastest causal kernel instead.
        ``size = L`` gives the regular block alone (B, 1, L, L): the rule without registers.
        """
        horizon, length, prefix_len = self._rule_tensors()
        device, total = horizon.device, size or self.total_len
        b = torch.arange(horizon.shape[0], device=device).view(-1, 1, 1, 1)
        q = torch.arange(first_query, total, device=device).view(1, 1, -1, 1)
        kv = torch.arange(total, device=device).view(1, 1, 1, -1)
        return register_mask_rule(b, q, kv, horizon, length, prefix_len, self.seq_len)

    def block_mask(
        self, num_heads: int | None = None, block_size: int = 128, compile: bool = False, size: int | None = None
    ):
        """A FlexAttention BlockMask of the rule, on the layout's device (``size = L``: regular block)."""
        # Lazy: FlexAttention's module is a slow import; only the FlexAttention paths need a BlockMask.
        from torch.nn.attention.flex_attention import create_block_mask

        total = size or self.total_len
        return create_block_mask(
            self.mask_mod(),
            B=self.anchor.shape[0],
            H=num_heads,
            Q_LEN=total,
            KV_LEN=total,
            device=self.anchor.device,
            BLOCK_SIZE=block_size,
            _compile=compile,
        )


def register_mask_rule(
    b: Tensor, q: Tensor, kv: Tensor, horizon: Tensor, length: Tensor, prefix_len: Tensor, seq_len: int
) -> Tensor:
    """Who may attend to whom in ``[regular | registers]`` — the one place the rule is written.

    Works elementwise on broadcastable index tensors, so FlexAttention (scalars under vmap) and
    the dense mask (index grids) evaluate the very same expression.

    - regular query i -> regular key j iff j <= i (or both inside the bidirectional prompt block);
    - register query r -> regular key j iff j <= anchor[r];
    - any query -> register key s iff s is the query itself (nothing attends to a register);
    - padded regular keys (j >= length) are never attended; every query sees itself, so no row is
      fully masked.
    """
    n = length[b]
    p = prefix_len[b]
    key_is_regular = kv < seq_len
    in_prompt_block = (q < p) & (kv < p)  # q < p implies q is regular (p <= seq_len)
    sees_regular = key_is_regular & (kv < n) & ((kv <= horizon[b, q]) | in_prompt_block)
    return sees_regular | (kv == q)


def step_mask(regular_keys: int, written: int, query_index: Tensor, register_anchor: Tensor) -> Tensor:
    """The rule for one incremental decoding step with registers (register drafting), (1, 1, n + R, K + R).

    Keys are ``K = regular_keys`` regular slots (a KV cache and the step's new tokens; only slots
    below ``written`` hold tokens) followed by the step's R registers. Queries are the step's n
    regular tokens, at regular indices ``query_index`` (n,), then the registers, anchored at regular
    indices ``register_anchor`` (R,). The same :func:`register_mask_rule` as in training.
    """
    device, count = query_index.device, register_anchor.shape[0]
    horizon = torch.cat([torch.arange(regular_keys, device=device), register_anchor])[None]  # by query index
    query = torch.cat([query_index, regular_keys + torch.arange(count, device=device)]).view(1, 1, -1, 1)
    keys = torch.arange(regular_keys + count, device=device).view(1, 1, 1, -1)
    filled = torch.tensor([written], device=device)
    batch = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    return register_mask_rule(batch, query, keys, horizon, filled, torch.zeros_like(filled), regular_keys)


# --------------------------------------------------------------------------------------------
# Layout builders
# --------------------------------------------------------------------------------------------


def grid_layout(
    offsets: Offsets,
    height: int,
    width: int,
    num_registers: int | None = None,
    valid_slots_only: bool = False,
    edge: EdgePolicy = "wrap",
    generator: torch.Generator | None = None,
) -> RegisterLayout:
    """Registers for a class-prefixed raster grid: input ``[class, x_1 .. x_{N-1}]``, N = h·w.

    Slot t (t = 0..N-1) follows input index t (the class token for t = 0) and predicts x_{t+d},
    valid iff t + d <= N. ``edge="drop"`` also invalidates 2D targets whose column wrapped into
    the next row; the class slot has no grid cell, so the edge policy does not apply to it.
    ``num_registers=None`` puts a register in every slot; otherwise R distinct random slots per
    sample (drawn only among valid ones when ``valid_slots_only``).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    if edge not in ("wrap", "drop"):
        raise ValueError(f"edge must be 'wrap' or 'drop', got {edge!r}")
    if offsets.cols is not None:
        max_cols = offsets.max_cols if offsets.max_cols is not None else int(offsets.cols.max())
        if width <= max_cols:
            raise ValueError(f"width ({width}) too small for 2D offsets with d_w up to {max_cols + 1}")
    num_tokens = height * width
    batch, device = offsets.batch_size, offsets.d.device
    slot = torch.arange(num_tokens, device=device).expand(batch, -1)  # anchor = slot index
    d = offsets.d.view(-1, 1)
    target_exists = slot + d <= num_tokens
    if edge == "drop" and offsets.cols is not None:
        anchor_col = (slot - 1) % width  # x_t sits at cell t - 1
        wrapped = (slot >= 1) & (anchor_col + offsets.cols.view(-1, 1) >= width)
        target_exists = target_exists & ~wrapped
    full = torch.full((batch,), num_tokens, device=device)
    return _place_registers(
        slot_anchor=slot,
        slot_exists=torch.ones_like(target_exists),
        target_exists=target_exists,
        offsets=offsets,
        num_registers=num_registers,
        valid_slots_only=valid_slots_only,
        generator=generator,
        seq_len=num_tokens,
        length=full,
        prefix_len=torch.zeros_like(full),
        regular_causal=True,
    )


def prompt_answer_layout(
    offsets: Offsets,
    prompt_len: Tensor,
    answer_len: Tensor,
    seq_len: int | None = None,
    num_registers: int | None = None,
    valid_slots_only: bool = False,
    prompt_attention: PromptAttention = "causal",
    generator: torch.Generator | None = None,
) -> RegisterLayout:
    """Registers for right-padded ``prompt + answer`` rows (text): one slot before each answer token.

    Sample b reads Q_b prompt then A_b answer tokens (regular indices 0..Q_b+A_b-1), padded to
    ``seq_len``. Register j (j < A_b) follows index Q_b + j - 1 and predicts answer token
    a_{j+d-1}, valid iff j + d - 1 <= A_b - 1. ``num_registers=None`` gives R = max_b A_b slots
    (padding slots invalid); otherwise R random slots among each sample's answer slots.
    """
    if prompt_attention not in ("causal", "bidirectional"):
        raise ValueError(f"prompt_attention must be 'causal' or 'bidirectional', got {prompt_attention!r}")
    prompt_len, answer_len = prompt_len.long(), answer_len.long()
    if prompt_len.shape != offsets.d.shape or answer_len.shape != offsets.d.shape:
        raise ValueError("prompt_len, answer_len and offsets must all have shape (B,)")
    if bool((prompt_len < 1).any()):
        raise ValueError("prompt_len must be >= 1 for every sample (the first register follows a prompt token)")
    if bool((answer_len < 0).any()):
        raise ValueError("answer_len must be >= 0")
    length = prompt_len + answer_len
    needed = int(length.max())
    seq_len = needed if seq_len is None else seq_len
    if seq_len < needed:
        raise ValueError(f"seq_len ({seq_len}) is shorter than the longest prompt + answer ({needed})")
    num_slots = max(int(answer_len.max()), 1)
    j = torch.arange(num_slots, device=prompt_len.device).expand(len(prompt_len), -1)
    slot_exists = j < answer_len.view(-1, 1)
    slot_anchor = torch.where(slot_exists, prompt_len.view(-1, 1) + j - 1, torch.zeros_like(j))
    target_exists = slot_exists & (slot_anchor + offsets.d.view(-1, 1) < length.view(-1, 1))
    prefix = prompt_len if prompt_attention == "bidirectional" else torch.zeros_like(prompt_len)
    return _place_registers(
        slot_anchor=slot_anchor,
        slot_exists=slot_exists,
        target_exists=target_exists,
        offsets=offsets,
        num_registers=num_registers,
        valid_slots_only=valid_slots_only,
        generator=generator,
        seq_len=seq_len,
        length=length,
        prefix_len=prefix,
    )


def anchored_layout(
    anchor: Tensor, offset: Tensor, length: Tensor, seq_len: int | None = None, prefix_len: Tensor | None = None
) -> RegisterLayout:
    """Registers at given anchors with given offsets, over right-padded rows of ``length`` (B,) regular tokens.

    Register r of sample b follows regular index ``anchor[b, r]`` (B, R) and predicts index
    ``anchor + offset`` from position ``anchor + offset - 1``; ``offset`` is (B, R) or (R,) for every
    sample, so one layout may mix offsets (register drafting: offsets 2..k after the last prompt token,
    whose targets lie past the sequence). Every register is valid (its logits are wanted).
    ``prefix_len`` (B,) reads that many leading tokens bidirectionally (default: plain causal).
    """
    length = length.long()
    offset = offset.long().expand_as(anchor)
    seq_len = int(length.max()) if seq_len is None else seq_len
    target = anchor + offset
    return RegisterLayout(
        anchor=anchor,
        target=target,
        position=target - 1,
        valid=torch.ones_like(anchor, dtype=torch.bool),
        offset=offset,
        seq_len=seq_len,
        length=length,
        prefix_len=torch.zeros_like(length) if prefix_len is None else prefix_len.long(),
    )


def num_registers_for_fraction(fraction: float, num_slots: int) -> int:
    """R for a sparse fraction of ``num_slots`` (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * num_slots))


def _place_registers(
    slot_anchor: Tensor,
    slot_exists: Tensor,
    target_exists: Tensor,
    offsets: Offsets,
    num_registers: int | None,
    valid_slots_only: bool,
    generator: torch.Generator | None,
    seq_len: int,
    length: Tensor,
    prefix_len: Tensor,
    regular_causal: bool = False,
) -> RegisterLayout:
    """Pick R slots per sample (all, or R distinct at random) and derive the register triples."""
    batch, num_slots = slot_anchor.shape
    if num_registers is None:
        chosen = torch.arange(num_slots, device=slot_anchor.device).expand(batch, -1)
    else:
        if not 1 <= num_registers <= num_slots:
            raise ValueError(f"num_registers must be in [1, {num_slots}] (the number of slots), got {num_registers}")
        # Uniform keys in [0, 1), pushed back by 1 for slots we would rather not use and by 2 for
        # slots that do not exist: the R smallest keys are R distinct slots drawn uniformly among
        # the preferred ones first. Shapes stay static (R fixed per batch).
        keys = torch.rand(batch, num_slots, generator=generator, device=generator_device(generator))
        keys = keys.to(slot_anchor.device) + 2.0 * (~slot_exists)
        if valid_slots_only:
            keys = keys + 1.0 * (~target_exists)
        chosen = keys.topk(num_registers, dim=1, largest=False).indices.sort(dim=1).values
    anchor = slot_anchor.gather(1, chosen)
    valid = target_exists.gather(1, chosen)
    target = anchor + offsets.d.view(-1, 1)
    position = torch.where(valid, target - 1, anchor)
    return RegisterLayout(
        anchor=anchor,
        target=target,
        position=position,
        valid=valid,
        offset=offsets.d,
        seq_len=seq_len,
        length=length,
        prefix_len=prefix_len,
        regular_causal=regular_causal,
    )
