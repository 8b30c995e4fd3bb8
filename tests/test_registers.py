"""The register core against the spec (docs/method.md): worked examples, invariants, mask, loss."""

from collections import Counter
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from mutor_vision.core.loss import combined_loss
from mutor_vision.core.registers import (
    IGNORE_INDEX,
    Offsets,
    grid_layout,
    num_registers_for_fraction,
    offsets_2d_support,
    prompt_answer_layout,
    sample_offsets_1d,
    sample_offsets_2d,
)

SEEDS = range(20)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def offsets_2d(rows: list[int], cols: list[int], width: int) -> Offsets:
    r, c = torch.tensor(rows), torch.tensor(cols)
    return Offsets(d=r * width + c, rows=r, cols=c)


def random_text_layout(seed: int, prompt_attention: str = "causal", sparse: bool = False):
    g = gen(seed)
    prompt = torch.randint(1, 6, (4,), generator=g)
    answer = torch.randint(0, 7, (4,), generator=g)
    answer[0] = 6  # at least one sample has answer slots
    offsets = sample_offsets_1d(4, 4, generator=g)
    r = 3 if sparse else None
    layout = prompt_answer_layout(
        offsets, prompt, answer, seq_len=int((prompt + answer).max()) + 2, num_registers=r, generator=g
    )
    if prompt_attention == "bidirectional":
        layout = prompt_answer_layout(
            offsets,
            prompt,
            answer,
            seq_len=layout.seq_len,
            num_registers=r,
            prompt_attention="bidirectional",
            generator=gen(seed),
        )
    return layout, prompt, answer


# ---------------------------------------------------------------- worked examples


def test_text_worked_example_exact():
    # Q = 3, A = 5, d = 2: q0 q1 q2 r a0 r a1 r a2 r a3 r a4.
    layout = prompt_answer_layout(Offsets(d=torch.tensor([2])), torch.tensor([3]), torch.tensor([5]))
    assert layout.anchor.tolist() == [[2, 3, 4, 5, 6]]
    assert layout.valid.tolist() == [[True, True, True, True, False]]
    # a1..a4 sit at regular positions 4..7 (a0 at 3).
    assert layout.target[layout.valid].tolist() == [4, 5, 6, 7]
    assert layout.position[layout.valid].tolist() == [3, 4, 5, 6]
    assert layout.seq_len == 8 and layout.length.tolist() == [8]
    ids = torch.tensor([[10, 11, 12, 20, 21, 22, 23, 24]])  # q0 q1 q2 a0..a4
    assert layout.register_labels(ids).tolist() == [[21, 22, 23, 24, IGNORE_INDEX]]


def test_grid_worked_example_2d():
    # w = 16, D = 4: slot 5 (after x_5 at cell (0, 4)), (d_h, d_w) = (2, 3) -> d = 18, target x_23
    # at cell (1, 6), position 22 = cell (1, 5).
    offsets = offsets_2d([1], [2], width=16)
    assert offsets.d.tolist() == [18]
    layout = grid_layout(offsets, 16, 16)
    assert layout.num_registers == 256 and layout.seq_len == 256
    assert (layout.anchor[0] == torch.arange(256)).all()
    assert layout.target[0, 5].item() == 23 and layout.position[0, 5].item() == 22
    assert divmod(23 - 1, 16) == (1, 6) and divmod(22 - 1, 16) == (1, 5)
    # Valid iff t + d <= N.
    assert layout.valid[0].sum().item() == 256 - 18 + 1  # t = 0..238
    tokens = torch.arange(100, 356).view(1, 256)  # x_k = 99 + k
    labels = layout.register_labels(F.pad(tokens, (1, 0)))
    assert labels[0, 5].item() == 99 + 23


def test_grid_raster_wrap_and_drop():
    # Slot 15 (x_15 at (0, 14)) with (d_h, d_w) = (1, 4): d = 3 -> x_18 at (1, 1), below-left.
    offsets = offsets_2d([0], [3], width=16)
    wrap = grid_layout(offsets, 16, 16, edge="wrap")
    drop = grid_layout(offsets, 16, 16, edge="drop")
    assert wrap.target[0, 15].item() == 18 and wrap.valid[0, 15]
    assert not drop.valid[0, 15]
    assert drop.position[0, 15].item() == drop.anchor[0, 15].item()  # invalid: harmless in-range row
    # Slot 12 (x_12 at (0, 11)) stays on its row: kept by both policies.
    assert wrap.valid[0, 12] and drop.valid[0, 12]
    # The class slot has no cell: the edge policy does not touch it.
    assert drop.valid[0, 0]


def test_offsets_2d_support_matches_spec():
    assert offsets_2d_support(4, 16) == [1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51]


# ---------------------------------------------------------------- offsets


def test_offsets_2d_allowed_and_uniform():
    offsets = sample_offsets_2d(60_000, 4, 16, generator=gen(0))
    support = set(offsets_2d_support(4, 16))
    counts = Counter(offsets.d.tolist())
    assert set(counts) == support  # all 15 appear, nothing else
    expected = 60_000 / 15
    assert all(abs(c - expected) < 0.06 * expected for c in counts.values()), counts
    assert (offsets.d == offsets.rows * 16 + offsets.cols).all()
    assert not ((offsets.rows == 0) & (offsets.cols == 0)).any()


def test_offsets_1d_allowed_and_uniform():
    offsets = sample_offsets_1d(40_000, 4, generator=gen(1))
    counts = Counter(offsets.d.tolist())
    assert set(counts) == {1, 2, 3, 4}
    assert all(abs(c - 10_000) < 500 for c in counts.values()), counts
    assert offsets.rows is None and offsets.cols is None


def test_generator_reproducible():
    a = grid_layout(sample_offsets_2d(8, 4, 16, generator=gen(3)), 16, 16, num_registers=80, generator=gen(4))
    b = grid_layout(sample_offsets_2d(8, 4, 16, generator=gen(3)), 16, 16, num_registers=80, generator=gen(4))
    c = grid_layout(sample_offsets_2d(8, 4, 16, generator=gen(3)), 16, 16, num_registers=80, generator=gen(5))
    assert torch.equal(a.anchor, b.anchor) and torch.equal(a.offset, b.offset)
    assert not torch.equal(a.anchor, c.anchor)


def test_sampled_grid_layout_never_reads_a_tensor_on_the_host():
    # Meta tensors hold no data: any host read (.item(), int(), bool()) raises. A layout that builds on
    # them never makes a training step wait for the GPU. Offsets made by hand carry no host-side bound
    # on their columns, so their check reads one (the test's control).
    offsets = sample_offsets_2d(4, 4, 16, device="meta")
    layout = grid_layout(offsets, 16, 16, num_registers=80, edge="drop")
    assert layout.anchor.device.type == "meta" and layout.anchor.shape == (4, 80)
    with pytest.raises(RuntimeError, match="meta"):
        grid_layout(Offsets(offsets.d, offsets.rows, offsets.cols), 16, 16, num_registers=80)


def test_layout_to_moves_every_tensor_and_keeps_the_rest():
    layout = grid_layout(sample_offsets_2d(3, 4, 16, generator=gen(0)), 16, 16, num_registers=20, generator=gen(1))
    moved = layout.to("meta")
    for field in fields(layout):
        before, after = getattr(layout, field.name), getattr(moved, field.name)
        if isinstance(before, torch.Tensor):
            assert after.device.type == "meta" and after.shape == before.shape and after.dtype == before.dtype
        else:
            assert after == before, field.name
    back = layout.to("cpu")
    for field in fields(layout):
        if isinstance(getattr(layout, field.name), torch.Tensor):
            assert torch.equal(getattr(back, field.name), getattr(layout, field.name)), field.name


# ---------------------------------------------------------------- slots and triples


@pytest.mark.parametrize("edge", ["wrap", "drop"])
@pytest.mark.parametrize("num_registers", [None, 80])
def test_grid_triples_over_seeds(edge, num_registers):
    h = w = 16
    n = h * w
    for seed in SEEDS:
        g = gen(seed)
        offsets = sample_offsets_2d(6, 4, w, generator=g)
        layout = grid_layout(offsets, h, w, num_registers=num_registers, edge=edge, generator=g)
        d = offsets.d.view(-1, 1)
        assert torch.equal(layout.target, layout.anchor + d)
        valid = layout.valid
        assert torch.equal(layout.position[valid], (layout.anchor + d - 1).expand_as(valid)[valid])
        # Independent check of validity from grid cells.
        in_range = layout.target <= n
        if edge == "drop":
            anchor_cell_col = (layout.anchor - 1) % w
            same_row = (layout.anchor == 0) | (anchor_cell_col + offsets.cols.view(-1, 1) < w)
            in_range = in_range & same_row
        assert torch.equal(valid, in_range)
        # Valid registers never need a RoPE row beyond N - 1.
        assert int(layout.position.max()) <= n - 1


def test_sparse_slots_distinct_and_uniform():
    n, r = 64, 20
    hits = torch.zeros(n)
    for seed in range(200):
        g = gen(seed)
        layout = grid_layout(sample_offsets_1d(4, 4, generator=g), 8, 8, num_registers=r, generator=g)
        assert layout.anchor.shape == (4, r)
        for row in layout.anchor:
            assert len(set(row.tolist())) == r  # exactly R distinct slots
            assert torch.equal(row, row.sort().values)
            hits[row] += 1
    expected = 200 * 4 * r / n
    assert (hits - expected).abs().max() < 0.25 * expected


def test_valid_slots_only():
    for seed in SEEDS:
        g = gen(seed)
        offsets = sample_offsets_2d(4, 4, 8, generator=g)
        layout = grid_layout(offsets, 8, 8, num_registers=10, valid_slots_only=True, edge="drop", generator=g)
        assert layout.valid.all()  # 64 slots, at most 27 invalid: 10 valid ones always exist
    # When fewer valid slots exist than R, the rest are invalid (static shape kept).
    layout = grid_layout(Offsets(d=torch.tensor([60])), 8, 8, num_registers=10, valid_slots_only=True, generator=gen(0))
    assert layout.anchor.shape == (1, 10)
    assert layout.anchor[layout.valid].tolist() == [0, 1, 2, 3, 4]  # t + 60 <= 64


def test_text_layout_over_seeds():
    for seed in SEEDS:
        layout, prompt, answer = random_text_layout(seed)
        for b in range(len(prompt)):
            q, a, d = int(prompt[b]), int(answer[b]), int(layout.offset[b])
            exists = torch.arange(layout.num_registers) < a
            valid = layout.valid[b]
            assert torch.equal(layout.anchor[b][exists], torch.arange(a) + q - 1)
            assert torch.equal(valid, exists & (torch.arange(layout.num_registers) + d - 1 <= a - 1))
            assert torch.equal(layout.position[b][valid], layout.anchor[b][valid] + d - 1)


def test_text_batch_rows_equal_single_samples():
    layout, prompt, answer = random_text_layout(7)
    for b in range(len(prompt)):
        single = prompt_answer_layout(Offsets(d=layout.offset[b : b + 1]), prompt[b : b + 1], answer[b : b + 1])
        a = int(answer[b])
        assert torch.equal(layout.anchor[b, :a], single.anchor[0, :a])
        assert torch.equal(layout.valid[b, :a], single.valid[0, :a])
        assert not layout.valid[b, a:].any()


def test_fraction_helper():
    assert num_registers_for_fraction(0.31, 256) == 80
    assert num_registers_for_fraction(0.01, 5) == 1


# ---------------------------------------------------------------- mask


def sample_layouts():
    g = gen(11)
    yield grid_layout(sample_offsets_2d(3, 4, 8, generator=g), 8, 8)
    yield grid_layout(sample_offsets_2d(3, 4, 8, generator=g), 8, 8, num_registers=20, generator=g, edge="drop")
    yield grid_layout(sample_offsets_1d(3, 4, generator=g), 4, 4, num_registers=5, generator=g)
    yield random_text_layout(2)[0]
    yield random_text_layout(3, sparse=True)[0]
    yield random_text_layout(4, prompt_attention="bidirectional")[0]


@pytest.mark.parametrize("layout", list(sample_layouts()))
def test_dense_mask_equals_mask_mod(layout):
    dense = layout.dense_mask()
    total = layout.total_len
    assert dense.shape == (layout.anchor.shape[0], 1, total, total) and dense.dtype == torch.bool
    from_flex = create_mask(layout.mask_mod(), layout.anchor.shape[0], 1, total, total, device="cpu")
    assert torch.equal(dense, from_flex)


@pytest.mark.parametrize("layout", list(sample_layouts()))
def test_mask_semantics(layout):
    dense = layout.dense_mask()[:, 0]
    seq_len = layout.seq_len
    for b in range(dense.shape[0]):
        m = dense[b]
        n = int(layout.length[b])
        p = int(layout.prefix_len[b])
        assert m.any(dim=1).all()  # no fully masked row
        # Nothing attends to a register except the register itself.
        assert torch.equal(m[:, seq_len:], torch.eye(m.shape[0], dtype=torch.bool)[:, seq_len:])
        # A register sees exactly the regular keys <= its anchor (none of them padding) plus itself.
        for r in range(layout.num_registers):
            row = m[seq_len + r, :seq_len]
            expected = torch.arange(seq_len) <= layout.anchor[b, r]
            expected &= torch.arange(seq_len) < n
            assert torch.equal(row, expected)
        # Regular block: causal, prompt block bidirectional, padding never attended by real tokens.
        regular = m[:n, :seq_len]
        expected = torch.ones(n, seq_len, dtype=torch.bool).tril()
        expected[:p, :p] = True
        expected[:, n:] = False
        assert torch.equal(regular, expected)
        # Padded queries attend only real tokens plus themselves.
        for i in range(n, seq_len):
            assert torch.equal(m[i, n:seq_len], torch.arange(n, seq_len) == i)


def test_registers_leave_regular_attention_unchanged():
    # The invariance behind MuToR, at the attention level: regular outputs with registers appended
    # equal plain causal attention over the regular block.
    g = gen(5)
    layout = grid_layout(sample_offsets_2d(2, 4, 8, generator=g), 8, 8, num_registers=24, generator=g)
    q, k, v = (torch.randn(2, 3, layout.total_len, 16, generator=g) for _ in range(3))
    with_registers = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
    plain = F.scaled_dot_product_attention(
        q[:, :, : layout.seq_len], k[:, :, : layout.seq_len], v[:, :, : layout.seq_len], is_causal=True
    )
    torch.testing.assert_close(with_registers[:, :, : layout.seq_len], plain, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_block_mask_attention_equals_dense_sdpa():
    # FlexAttention (eager on CPU: slow but exact) with the core's BlockMask computes the same
    # attention as SDPA with the core's dense mask.
    from torch.nn.attention.flex_attention import flex_attention

    layout = random_text_layout(9, prompt_attention="bidirectional", sparse=True)[0]
    g = gen(9)
    q, k, v = (torch.randn(4, 2, layout.total_len, 16, generator=g) for _ in range(3))
    flex = flex_attention(q, k, v, block_mask=layout.block_mask())
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- loss


def test_combined_loss_against_hand_computation():
    g = gen(0)
    ntp_logits = torch.randn(2, 3, 5, generator=g)
    ntp_labels = torch.tensor([[0, 1, 2], [3, IGNORE_INDEX, 4]])
    reg_logits = torch.randn(2, 2, 5, generator=g)
    reg_labels = torch.tensor([[1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]])
    parts = combined_loss(ntp_logits, ntp_labels, reg_logits, reg_labels, register_weight=0.3)

    def nll(logits, label):
        return -(logits.exp() / logits.exp().sum()).log()[label]

    ntp = sum(nll(ntp_logits[b, t], ntp_labels[b, t]) for b, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]) / 5
    reg = nll(reg_logits[0, 0], 1)
    torch.testing.assert_close(parts.ntp, ntp)
    torch.testing.assert_close(parts.reg, reg)
    torch.testing.assert_close(parts.loss, 0.7 * ntp + 0.3 * reg)
    assert parts.num_ntp_tokens.item() == 5 and parts.num_reg_tokens.item() == 1


def test_sample_normalization_is_the_mean_of_per_row_losses():
    # Row 0: 3 answer tokens, 1 valid register; row 1: 2 tokens, no valid register (it counts 0 in L_reg).
    g = gen(1)
    ntp_logits, reg_logits = torch.randn(2, 3, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    ntp_labels = torch.tensor([[0, 1, 2], [3, IGNORE_INDEX, 4]])
    reg_labels = torch.tensor([[1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]])
    parts = combined_loss(ntp_logits, ntp_labels, reg_logits, reg_labels, 0.3, normalization="sample")
    rows = [
        combined_loss(ntp_logits[b : b + 1], ntp_labels[b : b + 1], reg_logits[b : b + 1], reg_labels[b : b + 1], 0.3)
        for b in range(2)
    ]
    torch.testing.assert_close(parts.loss, (rows[0].loss + rows[1].loss) / 2)
    torch.testing.assert_close(parts.reg, rows[0].reg / 2)
    token = combined_loss(ntp_logits, ntp_labels, reg_logits, reg_labels, 0.3)
    assert not torch.allclose(token.ntp, parts.ntp)  # 3 + 2 tokens: token and sample means differ


def test_loss_without_valid_registers_is_finite():
    ntp_logits = torch.randn(1, 4, 7, requires_grad=True)
    reg_logits = torch.randn(1, 2, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4]])
    parts = combined_loss(ntp_logits, labels, reg_logits, torch.full((1, 2), IGNORE_INDEX), register_weight=0.5)
    assert parts.reg.item() == 0.0 and torch.isfinite(parts.loss)
    parts.loss.backward()
    assert torch.isfinite(ntp_logits.grad).all() and (reg_logits.grad == 0).all()
    torch.testing.assert_close(parts.loss, 0.5 * F.cross_entropy(ntp_logits[0], labels[0]))


def test_loss_without_registers_is_next_token():
    logits, labels = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    parts = combined_loss(logits, labels)
    torch.testing.assert_close(parts.loss, F.cross_entropy(logits.view(-1, 9), labels.view(-1)))
    assert parts.reg.item() == 0.0


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: sample_offsets_1d(2, 0), "d_max"),
        (lambda: sample_offsets_2d(2, 1, 16), "d_max_2d"),
        (lambda: sample_offsets_2d(2, 4, 3), "width"),
        (lambda: grid_layout(offsets_2d([0], [3], 16), 4, 3), "width"),
        (lambda: grid_layout(sample_offsets_1d(2, 4), 4, 4, num_registers=17), "num_registers"),
        (lambda: grid_layout(sample_offsets_1d(2, 4), 4, 4, num_registers=0), "num_registers"),
        (lambda: grid_layout(sample_offsets_1d(2, 4), 4, 4, edge="mirror"), "edge"),
        (lambda: prompt_answer_layout(Offsets(torch.tensor([1])), torch.tensor([0]), torch.tensor([3])), "prompt_len"),
        (
            lambda: prompt_answer_layout(Offsets(torch.tensor([1])), torch.tensor([2]), torch.tensor([3]), seq_len=4),
            "seq_len",
        ),
        (lambda: combined_loss(torch.randn(1, 2, 3), torch.zeros(1, 2).long(), register_weight=1.5), "register_weight"),
        (lambda: num_registers_for_fraction(0.0, 10), "fraction"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
