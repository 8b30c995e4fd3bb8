"""Register drafting (self-speculative decoding): exact greedy output, the model's own distribution,
registers that never change a next-token logit, and clear errors for what was never trained."""

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from mutor_vision.core.drafting import (
    DecodeStats,
    Drafter,
    Drafts,
    accepted_drafts,
    check_draft_tokens,
    correction,
    round_registers,
)
from mutor_vision.core.registers import anchored_layout
from mutor_vision.errors import ConfigError
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate, generate_drafted


def model_with(registers: RegisterConfig, grid: int = 4, vocab: int = 12, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=32, vocab_size=vocab, num_classes=5, grid_size=grid,
        token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, registers=registers,
    )  # fmt: skip
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # separated logits: greedy has no near-ties
    return model


MUTOR2D = RegisterConfig(mode="mutor2d", d_max_2d=4, num_registers=None)
MUTOR1D = RegisterConfig(mode="mutor1d", d_max=4, num_registers=None)


@pytest.mark.parametrize(("registers", "k"), [(MUTOR2D, 2), (MUTOR2D, 3), (MUTOR1D, 4)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_greedy_drafting_equals_plain_greedy(registers, k, cfg_scale):
    for seed in range(3):
        model = model_with(registers, seed=seed)
        labels = torch.tensor([0, 1, 2, 3, 4, 0])
        greedy = SamplingConfig(cfg_scale=cfg_scale, temperature=0.0)
        plain = generate(model, labels, greedy)
        stats = DecodeStats()
        drafted = generate_drafted(model, labels, greedy, k, stats)
        assert torch.equal(plain, drafted), (seed, k)
        assert 1.0 <= stats.tokens_per_forward <= k and stats.forwards <= 16


def test_registers_never_change_the_next_token_logits():
    model = model_with(MUTOR2D)
    labels = torch.tensor([1, 3])
    tokens = torch.randint(0, 12, (2, 16), generator=torch.Generator().manual_seed(0))
    full = model(tokens, labels).logits  # (2, 16, V): logits[:, j] predicts x_{j+1}
    model.setup_caches(2)
    with torch.no_grad():
        first, _ = model.extend(
            model.cls_embedding(labels)[:, None], torch.tensor([0]), torch.tensor([0, 0]), torch.tensor([1, 2])
        )
        chunk, register_logits = model.extend(
            model.tok_embeddings(tokens[:, :3]),
            torch.tensor([1, 2, 3]),
            torch.tensor([1, 2, 3]),
            torch.tensor([2, 3, 4]),
        )
    model.clear_caches()
    torch.testing.assert_close(first[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 1:4], atol=1e-5, rtol=1e-5)
    assert register_logits.shape == (2, 3, 12)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_drafted_sampling_has_the_model_distribution(cfg_scale):
    # 1,600 drafted images against 3,000 plain ones; per position, a chi-square test of the token
    # counts. Exactness means no position differs beyond chance (p > 1e-3 everywhere). Rows of a
    # batch advance together, so batches of 2 and a mildly peaked head (std 0.15: drafts are often
    # accepted, often not) exercise acceptance, correction and multi-token commits alike.
    model = model_with(MUTOR2D, grid=4, vocab=6, seed=1)
    torch.nn.init.normal_(model.output.weight, std=0.15)
    settings = SamplingConfig(cfg_scale=cfg_scale, temperature=1.0, top_k=5)
    plain = generate(model, torch.zeros(3000, dtype=torch.long), settings.replace(seed=11)).view(3000, -1)
    drafted, forwards = [], 0
    for seed in range(800):
        stats = DecodeStats()
        labels = torch.zeros(2, dtype=torch.long)
        drafted.append(generate_drafted(model, labels, settings.replace(seed=seed), 3, stats).view(2, -1))
        forwards += stats.forwards
    drafted = torch.cat(drafted)
    assert forwards < 800 * 16 * 0.8  # many drafts accepted: the multi-token path was exercised
    for position in range(16):
        counts = torch.stack([torch.bincount(x[:, position], minlength=6) for x in (plain, drafted)]).numpy()
        counts = counts[:, counts.sum(axis=0) > 0]
        assert chi2_contingency(counts).pvalue > 1e-3, position


def test_acceptance_rule_on_a_worked_example():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]])
    q = torch.tensor([[[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]]])
    drafts = torch.tensor([[1, 0]])
    # draft 1: p/q = 0.5/0.75 = 2/3 (accepted below u = 2/3); draft 2: p/q = 0.2 (accepted below 0.2)
    assert accepted_drafts(p, q, drafts, torch.tensor([[0.6, 0.1]]), greedy=False).item() == 2
    assert accepted_drafts(p, q, drafts, torch.tensor([[0.7, 0.1]]), greedy=False).item() == 0
    assert accepted_drafts(p, q, drafts, torch.tensor([[0.6, 0.5]]), greedy=False).item() == 1
    # The correction after rejecting draft 1 draws from max(0, p - q) = [0.25, 0, 0] renormalised: token 0.
    assert correction(p[:, 0], q[:, 0], torch.tensor([0.99]), greedy=False).item() == 0
    assert accepted_drafts(p, q, drafts, torch.zeros(1, 2), greedy=True).item() == 0  # argmax p = 0 != 1


def test_what_was_never_trained_is_a_clear_error():
    labels = torch.tensor([0])
    with pytest.raises(ConfigError, match="trained without registers"):
        generate_drafted(model_with(RegisterConfig(mode="ntp")), labels, SamplingConfig(), 2)
    expected = r"never trained on offsets \[4\] \(mode mutor2d, d_max_2d 4, grid 8\).*at most draft_tokens 3"
    with pytest.raises(ConfigError, match=expected):  # on an 8-wide grid, offset 4 is no 2D target
        generate_drafted(model_with(MUTOR2D, grid=8), labels, SamplingConfig(), 4)
    with pytest.raises(ConfigError, match=r"offsets \[2, 3\].*d_max_2d 2.*cannot draft consecutive tokens"):
        generate_drafted(
            model_with(RegisterConfig(mode="mutor2d", d_max_2d=2, num_registers=None)), labels, SamplingConfig(), 3
        )
    with pytest.raises(ConfigError, match="draft_tokens must be >= 2"):
        check_draft_tokens(1, [1, 2], "")


def test_the_round_on_a_worked_example():
    # k = 3, two rows, greedy. Fed: the pending token and drafts (2, 1) for row 0, (2, 3) for row 1.
    # The model's argmax after each fed token is (2, 1, 0) for both rows: row 0 accepts both drafts,
    # row 1 only the first. Rows advance together: m = 1, and each row's next token is its own.
    drafter = Drafter(3)
    logits = torch.nn.functional.one_hot(torch.tensor([[2, 1, 0], [2, 1, 0]]), 4).float()
    registers = torch.arange(2 * 3 * 2 * 4, dtype=torch.float).view(2, 6, 4)  # argmax: always token 3
    registers[:, 2:4, 0] = 100.0  # the registers after fed token 1 (m = 1) draft token 0
    drafts = Drafts(tokens=torch.tensor([[2, 1], [2, 3]]), dist=torch.zeros(2, 2, 4))
    step = drafter.verify(logits, registers, drafts)
    assert step.accepted.tolist() == [2, 1] and step.m == 1
    assert step.tokens.tolist() == [[2, 1], [2, 1]]  # row 0: its accepted draft; row 1: the model's token
    assert step.drafts.tokens.tolist() == [[0, 0], [0, 0]]
    # A finished row (text past EOS) never holds the others back: row 0 alone sets m = 2 (the bonus token).
    step = drafter.verify(
        logits, registers, Drafts(torch.tensor([[2, 1], [0, 0]]), drafts.dist), finished=torch.tensor([False, True])
    )
    assert step.m == 2 and step.tokens[0].tolist() == [2, 1, 0]
    anchor, offset = round_registers(3, 3)
    assert anchor.tolist() == [0, 0, 1, 1, 2, 2] and offset.tolist() == [2, 3, 2, 3, 2, 3]


def test_the_round_commits_exact_draws():
    # 40,000 rows of one round with fixed p and q (V = 4): the first committed token, an accepted draft
    # or a correction from max(0, p - q), has the distribution p whatever q is (chi-square, p > 1e-3).
    generator = torch.Generator().manual_seed(0)
    rows, k = 40_000, 3
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    drafter = Drafter(k, temperature=1.0)
    dist = q.expand(rows, -1, -1)
    drafts = Drafts(torch.multinomial(q, rows, replacement=True, generator=generator).t(), dist)
    logits = p.log().expand(rows, -1, -1)
    step = drafter.verify(
        logits, torch.zeros(rows, 3 * (k - 1), 4), drafts, torch.rand(rows, 2 * k - 1, generator=generator)
    )
    counts = torch.bincount(step.tokens[:, 0], minlength=4).numpy()
    expected = (p[0] * rows).numpy()
    assert chisquare(counts, expected).pvalue > 1e-3
    assert 0 < int((step.accepted == 0).sum()) < rows  # both paths ran: corrections and accepted drafts


def test_anchored_layout_mixes_offsets():
    # Two right-padded prompts (3 and 2 tokens), registers with offsets 2 and 3 after each last prompt token.
    length = torch.tensor([3, 2])
    layout = anchored_layout((length - 1)[:, None].expand(2, 2), torch.tensor([2, 3]), length, prefix_len=length)
    assert layout.target.tolist() == [[4, 5], [3, 4]] and layout.position.tolist() == [[3, 4], [2, 3]]
    mask = layout.dense_mask()[:, 0].int()  # (2, 5, 5): [3 regular | 2 registers]
    assert mask[1].tolist() == [
        [1, 1, 0, 0, 0],  # the bidirectional prompt block; padding (index 2) is never attended
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # the padding row (its output unused) reads causally
        [1, 1, 0, 1, 0],  # a register sees the prefix up to its anchor and itself
        [1, 1, 0, 0, 1],
    ]


def test_decode_stats_add_up():
    stats = DecodeStats()
    assert stats.tokens_per_forward == 0.0
    stats.add(DecodeStats(forwards=4, tokens=8)).add(DecodeStats(forwards=6, tokens=7))
    assert (stats.forwards, stats.tokens, stats.tokens_per_forward) == (10, 15, 1.5)
    assert sum([DecodeStats(1, 3), DecodeStats(2, 3)], DecodeStats()) == DecodeStats(3, 6)
