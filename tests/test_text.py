"""The 1D text adapter on tiny random Llama and Gemma models with a tokenizer trained here."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mutor_vision.config import load_yaml
from mutor_vision.core.config import TextRegisterConfig
from mutor_vision.core.registers import Offsets, prompt_answer_layout
from mutor_vision.text.adapter import MuToRAdapter, answer_labels
from mutor_vision.text.answers import answers_match, extract_answer
from mutor_vision.text.config import TextTrainConfig
from mutor_vision.text.data import build_examples, collate, word_tokenizer
from mutor_vision.text.generate import greedy_generate
from mutor_vision.text.tiny import tiny_causal_lm
from mutor_vision.text.train import train_text

ROOT = Path(__file__).resolve().parent.parent
CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples? Answer: 3 + 4 = 7 #### 7",
    "Question: A box holds 12 eggs. How many eggs in 2 boxes? Answer: 12 * 2 = 24 #### 24",
    "Question: Sara reads 5 pages a day for 6 days. How many pages? Answer: 5 * 6 = 30 #### 30",
    "Question: 1,000 minus 250 is? Answer: 1000 - 250 = 750 #### 750",
]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(CORPUS)


def worked_batch():
    # Q = 3, A = 5 (docs/method.md §4): ids 10 11 12 | 20 21 22 23 24, plus a padded second row.
    input_ids = torch.tensor([[10, 11, 12, 20, 21, 22, 23, 24], [10, 11, 20, 21, 22, 0, 0, 0]])
    return input_ids, torch.tensor([3, 2]), torch.tensor([5, 3])


def test_worked_example_through_the_adapter():
    model = tiny_causal_lm(32)
    adapter = MuToRAdapter(model, TextRegisterConfig(d_max=2))
    input_ids, prompt_len, answer_len = worked_batch()
    layout = prompt_answer_layout(Offsets(torch.tensor([2, 2])), prompt_len, answer_len, seq_len=8)
    assert layout.anchor[0].tolist() == [2, 3, 4, 5, 6] and layout.position[0, :4].tolist() == [3, 4, 5, 6]
    assert layout.register_labels(input_ids)[0].tolist() == [21, 22, 23, 24, -100]
    labels = answer_labels(input_ids, prompt_len, answer_len)
    assert labels[0].tolist() == [-100, -100, 20, 21, 22, 23, 24, -100]
    assert labels[1].tolist() == [-100, 20, 21, 22, -100, -100, -100, -100]
    output = adapter(input_ids, prompt_len, answer_len, layout=layout)
    assert output.logits.shape == (2, 8, 32) and output.register_logits.shape == (2, 5, 32)


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt_attention", ["causal", "bidirectional"])
def test_regular_logits_unchanged_by_registers(kind, attn, prompt_attention):
    model = tiny_causal_lm(32, kind, attn)
    input_ids, prompt_len, answer_len = worked_batch()
    with_registers = MuToRAdapter(model, TextRegisterConfig(mode="mutor1d", d_max=3, prompt_attention=prompt_attention))
    without = MuToRAdapter(model, TextRegisterConfig(mode="ntp", prompt_attention=prompt_attention))
    a = with_registers(input_ids, prompt_len, answer_len, generator=torch.Generator().manual_seed(0)).logits
    b = without(input_ids, prompt_len, answer_len).logits
    for row, n in enumerate((prompt_len + answer_len).tolist()):
        assert (a[row, :n] - b[row, :n]).abs().max().item() <= 1e-5


def test_gemma_register_is_scaled_like_embeddings():
    model = tiny_causal_lm(32, "gemma")
    adapter = MuToRAdapter(model)
    embedding = model.get_input_embeddings()
    out = adapter.registers(embedding, 1, 1, torch.float32)[0, 0]
    torch.testing.assert_close(out, adapter.registers.vector * 32**0.5)
    llama = MuToRAdapter(tiny_causal_lm(32))
    torch.testing.assert_close(
        llama.registers(llama.model.get_input_embeddings(), 1, 1, torch.float32)[0, 0], llama.registers.vector
    )


def test_padded_batch_equals_samples_alone():
    # Batch loss = (1-a)·(Σ s_i)/(Σ n_i) + a·(Σ r_i)/(Σ m_i): compare with per-sample sums (a = 0 and 1).
    model = tiny_causal_lm(32)
    input_ids, prompt_len, answer_len = worked_batch()
    d = torch.tensor([2, 1])
    layout = prompt_answer_layout(Offsets(d), prompt_len, answer_len, seq_len=8)
    adapter = MuToRAdapter(model, TextRegisterConfig(weight=0.4, loss_normalization="token"))
    batch_loss = adapter.loss(
        input_ids, prompt_len, answer_len, adapter(input_ids, prompt_len, answer_len, layout=layout)
    )
    batch_loss.loss.backward()
    batch_grads = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()

    sums = {"ntp": [], "reg": []}
    grads = {"ntp": None, "reg": None}
    for row in range(2):
        n = int(prompt_len[row] + answer_len[row])
        ids = input_ids[row : row + 1, :n]
        single = prompt_answer_layout(Offsets(d[row : row + 1]), prompt_len[row : row + 1], answer_len[row : row + 1])
        for part, weight in (("ntp", 0.0), ("reg", 1.0)):
            adapter.weight = weight
            out = adapter(ids, prompt_len[row : row + 1], answer_len[row : row + 1], layout=single)
            parts = adapter.loss(ids, prompt_len[row : row + 1], answer_len[row : row + 1], out)
            count = parts.num_ntp_tokens if part == "ntp" else parts.num_reg_tokens
            (parts.loss * count).backward()
            sums[part].append((parts.loss.detach() * count, count))
            current = [p.grad.clone() for p in adapter.parameters()]
            grads[part] = current if grads[part] is None else [g + c for g, c in zip(grads[part], current, strict=True)]
            adapter.zero_grad()
    n_ntp = sum(c for _, c in sums["ntp"])
    n_reg = sum(c for _, c in sums["reg"])
    expected = 0.6 * sum(s for s, _ in sums["ntp"]) / n_ntp + 0.4 * sum(s for s, _ in sums["reg"]) / n_reg
    assert abs(batch_loss.loss.item() - expected.item()) <= 1e-5
    for got, g_ntp, g_reg in zip(batch_grads, grads["ntp"], grads["reg"], strict=True):
        assert (got - (0.6 * g_ntp / n_ntp + 0.4 * g_reg / n_reg)).abs().max().item() <= 1e-5


def test_answer_shorter_than_d_gives_finite_loss():
    model = tiny_causal_lm(32)
    adapter = MuToRAdapter(model, TextRegisterConfig(d_max=4))
    input_ids = torch.tensor([[10, 11, 12, 20]])
    layout = prompt_answer_layout(Offsets(torch.tensor([4])), torch.tensor([3]), torch.tensor([1]))
    parts = adapter.loss(
        input_ids,
        torch.tensor([3]),
        torch.tensor([1]),
        adapter(input_ids, torch.tensor([3]), torch.tensor([1]), layout=layout),
    )
    assert torch.isfinite(parts.loss) and parts.reg.item() == 0.0 and parts.num_reg_tokens.item() == 0
    parts.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in adapter.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
@pytest.mark.parametrize("mode", ["mutor1d", "ntp"])
@pytest.mark.parametrize("normalization", ["token", "sample"])
def test_chunked_head_loss_equals_whole_logits_loss(kind, mode, normalization):
    # The same loss and gradients whether the head + CE run in chunks of 3 positions or on whole logits.
    input_ids, prompt_len, answer_len = worked_batch()
    registers = TextRegisterConfig(mode=mode, d_max=3, loss_normalization=normalization)
    results = []
    for chunk in (0, 3):
        adapter = MuToRAdapter(tiny_causal_lm(32, kind), registers, head_chunk_size=chunk)
        assert adapter.head_chunk_size == chunk
        layout = adapter.layout(prompt_len, answer_len, 8, torch.Generator().manual_seed(0))
        parts = adapter(input_ids, prompt_len, answer_len, layout=layout, return_loss=True).loss
        parts["loss"].backward()
        grads = {name: p.grad.clone() for name, p in adapter.named_parameters() if p.grad is not None}
        results.append((parts, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert set(whole) == {"loss", "loss_ntp", "loss_reg"} and set(whole_grads) == set(chunked_grads)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-6)
    for name in whole_grads:
        torch.testing.assert_close(chunked_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)


def test_softcapped_head_falls_back_to_whole_logits():
    # Gemma 2 caps its logits (tanh): a chunked linear head would compute another loss, so it is not used.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0, pad_token_id=0,
    )  # fmt: skip
    adapter = MuToRAdapter(Gemma2ForCausalLM(config).eval(), TextRegisterConfig(d_max=2), head_chunk_size=4)
    assert adapter.head_chunk_size == 0
    input_ids, prompt_len, answer_len = worked_batch()
    layout = adapter.layout(prompt_len, answer_len, 8, torch.Generator().manual_seed(0))
    parts = adapter(input_ids, prompt_len, answer_len, layout=layout, return_loss=True).loss
    expected = adapter.loss(
        input_ids, prompt_len, answer_len, adapter(input_ids, prompt_len, answer_len, layout=layout)
    )
    torch.testing.assert_close(parts["loss"], expected.loss)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_attention_block_mask_form():
    model_sdpa = tiny_causal_lm(32, "llama", "sdpa")
    model_flex = tiny_causal_lm(32, "llama", "flex_attention")
    input_ids, prompt_len, answer_len = worked_batch()
    layout = prompt_answer_layout(Offsets(torch.tensor([2, 3])), prompt_len, answer_len, seq_len=8)
    sdpa, flex = MuToRAdapter(model_sdpa), MuToRAdapter(model_flex)
    assert flex.mask_form == "block"
    flex.registers.load_state_dict(sdpa.registers.state_dict())
    with torch.no_grad():
        a = sdpa(input_ids, prompt_len, answer_len, layout=layout)
        b = flex(input_ids, prompt_len, answer_len, layout=layout)
    torch.testing.assert_close(a.register_logits, b.register_logits, atol=1e-5, rtol=1e-5)
    for row, n in enumerate((prompt_len + answer_len).tolist()):
        torch.testing.assert_close(a.logits[row, :n], b.logits[row, :n], atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapter_and_register(tokenizer):
    from mutor_vision.text.train import build_adapter

    config = load_yaml(
        TextTrainConfig,
        ROOT / "configs" / "text" / "gsm8k_mutor.yaml",
        ["lora.enabled=true", "model.name_or_path=x", "data.jsonl=x", "data.hf_name=null"],
    )
    adapter = build_adapter(tiny_causal_lm(len(tokenizer)), config)
    trainable = {name for name, p in adapter.named_parameters() if p.requires_grad}
    assert "registers.vector" in trainable
    assert trainable - {"registers.vector"} and all("lora_" in name for name in trainable - {"registers.vector"})


@pytest.mark.parametrize(
    ("prediction", "reference", "match"),
    [
        ("so the answer is 18.0", "#### 18", True),
        ("#### 1,000", "#### 1000", True),
        ("She loses $5. #### -5", "#### -5", True),
        ("#### 3/4", "#### 0.75", True),
        ("#### 18", "#### 19", False),
        ("no number here", "#### 3", False),
        ("first 7 then 12", "#### 12", True),  # no ####: the last number counts
    ],
)
def test_numeric_answer_extraction(prediction, reference, match):
    assert answers_match(prediction, reference) is match


def test_extract_answer_values():
    assert extract_answer("#### $1,234.50") == extract_answer("1234.5")
    assert extract_answer("#### -0.5") < 0


def write_jsonl(path: Path, rows: int = 8) -> Path:
    lines = []
    for i in range(rows):
        text = CORPUS[i % len(CORPUS)]
        question, answer = text.split(" Answer: ")
        lines.append(json.dumps({"question": question.removeprefix("Question: "), "answer": answer}))
    path.write_text("\n".join(lines))
    return path


def tiny_run_config(data: Path, out_dir: Path, *overrides: str) -> TextTrainConfig:
    """The GSM8K MuToR recipe on a local JSONL with the tiny model, on CPU, without TensorBoard."""
    common = [f"data.jsonl={data}", "data.hf_name=null", "model.name_or_path=tiny", f"out_dir={out_dir}"]
    common += ["tensorboard=false", "data.max_length=64", "device=cpu"]
    return load_yaml(TextTrainConfig, ROOT / "configs" / "text" / "gsm8k_mutor.yaml", [*common, *overrides])


def test_examples_drop_over_long_and_collate(tokenizer, tmp_path):
    records = [json.loads(line) for line in write_jsonl(tmp_path / "d.jsonl").read_text().splitlines()]
    examples, dropped = build_examples(
        records, tokenizer, "question", "answer", "Question: {prompt}\nAnswer:", " {answer}", 24
    )
    assert dropped > 0 and len(examples) + dropped == len(records)
    assert all(
        e.prompt_ids[0] == tokenizer.bos_token_id and e.answer_ids[-1] == tokenizer.eos_token_id for e in examples
    )
    batch = collate(examples[:2], tokenizer.pad_token_id)
    assert (
        batch["input_ids"].shape[0] == 2
        and (batch["prompt_len"] + batch["answer_len"]).max() == batch["input_ids"].shape[1]
    )


def test_short_cpu_training_lowers_loss_and_generates(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", rows=8)
    config = tiny_run_config(
        data, tmp_path / "run", "epochs=30", "global_batch_size=4", "micro_batch_size=2",
        "optim.lr=3e-3", "optim.warmup_ratio=0.05", "save_every=1000", "registers.prompt_attention=bidirectional"
    )  # fmt: skip
    model = tiny_causal_lm(len(tokenizer))
    result = train_text(config, model=model, tokenizer=tokenizer)
    assert result.step == 60 and result.reason == "completed"
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    export = result.checkpoint / "export"
    assert load_file(export / "registers.safetensors")["vector"].shape == (32,)
    assert json.loads((export / "mutor_text.json").read_text())["prompt_attention"] == "bidirectional"
    prompt = tokenizer("Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:")["input_ids"]
    tokens = greedy_generate(model, prompt, 20, tokenizer.eos_token_id, prompt_attention="bidirectional")
    assert 0 < len(tokens) <= 20


def test_gsm8k_eval_cli_on_a_trained_export(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", rows=4)
    model = tiny_causal_lm(len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from eval import gsm8k

    argv = ["--ckpt", str(tmp_path / "base"), "--data", str(data), "--max-new-tokens", "8", "--batch-size", "3"]
    results = gsm8k.run([*argv, "--device", "cpu", "--out", str(tmp_path / "acc.json")])
    assert results["total"] == 4 and results["scoring"] == "authors" and 0.0 <= results["accuracy"] <= 1.0
    assert {"accuracy_authors", "accuracy_lenient"} <= set(results) and results["max_new_tokens"] == 8
    assert json.loads((tmp_path / "acc.json").read_text())["total"] == 4
    assert (
        gsm8k.main(["--ckpt", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "x.json")]) == 4
    )


def test_math500_eval_cli(tokenizer, tmp_path):
    rows = [{"problem": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "7"}] * 3
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = tiny_causal_lm(len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    from eval import math500

    out = tmp_path / "math.json"
    results = math500.run(["--ckpt", str(tmp_path / "base"), "--data", str(data), "--max-new-tokens", "6",
                           "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert results["total"] == 3 and results["scoring"] == "boxed" and results["benchmark"] == "math500"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no problem field"}))
    assert math500.main(["--ckpt", str(tmp_path / "base"), "--data", str(bad), "--out", str(out)]) == 4


@pytest.mark.parametrize(
    ("kind", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gemma", "sdpa"), ("qwen2", "sdpa")]
)
def test_batched_greedy_equals_one_prompt_at_a_time(tokenizer, kind, attn):
    # Causal prompts: each row equals Hugging Face's own greedy generate on that prompt alone.
    # Bidirectional prompts: each row equals the same prompt decoded alone (no padding).
    from mutor_vision.text.generate import greedy_generate_batch

    model = tiny_causal_lm(len(tokenizer), kind, attn, seed=3)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.5)  # separated logits: no near-ties
    texts = [CORPUS[i].split(" Answer: ")[0] + " Answer:" for i in range(4)] + ["Question: 1,000 minus"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    eos, form = tokenizer.eos_token_id, "bool" if attn == "sdpa" else "float"
    batched = greedy_generate_batch(model, prompts, 12, eos, "causal", form, tokenizer.pad_token_id)
    for prompt, row in zip(prompts, batched, strict=True):
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()  # fmt: skip
        assert row == reference
    both = greedy_generate_batch(model, prompts, 12, eos, "bidirectional", form, tokenizer.pad_token_id)
    alone = [greedy_generate_batch(model, [p], 12, eos, "bidirectional", form)[0] for p in prompts]
    assert both == alone


def test_train_sft_config_errors_name_the_key(capsys):
    import train_sft

    config = str(ROOT / "configs" / "text" / "gsm8k_mutor.yaml")
    assert train_sft.main(["--config", config, "registers.d_maxx=3"]) == 2
    assert "registers.d_maxx" in capsys.readouterr().err
    assert train_sft.main(["--config", config, "registers.weight=1.5"]) == 2
    assert "weight" in capsys.readouterr().err
    for path in sorted((ROOT / "configs" / "text").glob("gsm8k_*.yaml")):  # tiny_cpu.yaml: its own test
        loaded = load_yaml(TextTrainConfig, path)
        assert loaded.registers.d_max == 4
        # The MuToR authors' recipe: AdamW (0.9, 0.999), eps 1e-6, no weight decay, warm-up 10 % then
        # linear decay, clip 1.0; a bidirectional prompt; per-sample loss means; their template.
        o = loaded.optim
        assert (o.betas, o.eps, o.weight_decay, o.schedule, o.warmup_ratio, o.grad_clip, o.lr) == (
            [0.9, 0.999],
            1e-6,
            0.0,
            "warmup_linear",
            0.1,
            1.0,
            5e-5,
        )
        assert loaded.registers.prompt_attention == "bidirectional" and loaded.registers.loss_normalization == "sample"
        assert (
            loaded.data.prompt_template == "Question: {prompt}\n\nAnswer:"
            and loaded.data.answer_template == " {answer}"
        )


def test_sample_normalization_micro_batch_ten_equals_ten_micro_batches_of_one(tokenizer, tmp_path):
    # The authors' objective: batch 1 with 10 accumulation steps. Micro-batch 10 with
    # loss_normalization: sample gives the same update (fp32, CPU); the token mean does not.
    data = write_jsonl(tmp_path / "train.jsonl", rows=10)

    def one_step(micro: int, normalization: str, run: str) -> dict[str, torch.Tensor]:
        config = tiny_run_config(
            data, tmp_path / run, "epochs=1", "global_batch_size=10", f"micro_batch_size={micro}",
            "optim.lr=1e-2", "optim.schedule=constant", f"registers.loss_normalization={normalization}"
        )  # fmt: skip
        model = tiny_causal_lm(len(tokenizer))
        train_text(config, model=model, tokenizer=tokenizer)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    ten, ones = one_step(10, "sample", "a"), one_step(1, "sample", "b")
    token = one_step(10, "token", "c")
    gap = max((ten[k] - ones[k]).abs().max().item() for k in ten)  # summation order only
    token_gap = max((token[k] - ones[k]).abs().max().item() for k in token)
    assert gap < 2e-5 and token_gap > 50 * gap, (gap, token_gap)


def test_text_resume_is_exact(tokenizer, tmp_path, monkeypatch):
    import signal

    data = write_jsonl(tmp_path / "train.jsonl", rows=8)

    def cfg(run: str) -> TextTrainConfig:
        return tiny_run_config(
            data, tmp_path / run, "epochs=2", "global_batch_size=4",
            "micro_batch_size=2", "save_every=100", "optim.lr=1e-3"
        )  # fmt: skip

    straight = train_text(cfg("a"), model=tiny_causal_lm(len(tokenizer)), tokenizer=tokenizer)
    original, calls = MuToRAdapter.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # inside step 2 (2 micro-batches per step)
            signal.raise_signal(signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MuToRAdapter, "loss", loss)
    first = train_text(cfg("b"), model=tiny_causal_lm(len(tokenizer)), tokenizer=tokenizer)
    monkeypatch.undo()
    assert first.reason == "terminated" and first.step == 2
    second = train_text(cfg("b"), resume="auto", model=tiny_causal_lm(len(tokenizer)), tokenizer=tokenizer)
    assert second.step == straight.step == 4
    assert first.losses + second.losses == straight.losses


def test_register_drafting_gives_exactly_greedy_output(tokenizer, tmp_path):
    # A tiny model trained briefly with MuToR-1D: its registers draft, the model verifies; every
    # output equals plain greedy decoding, in fewer forwards when drafts are right.
    from mutor_vision.core.drafting import DecodeStats
    from mutor_vision.text.generate import greedy_generate_batch

    data = write_jsonl(tmp_path / "train.jsonl", rows=8)
    config = tiny_run_config(
        data, tmp_path / "run", "epochs=40", "global_batch_size=4",
        "micro_batch_size=4", "optim.lr=3e-3", "save_every=1000"
    )  # fmt: skip
    model = tiny_causal_lm(len(tokenizer))
    from mutor_vision.text.train import TextTask
    from mutor_vision.training.loop import run

    task = TextTask(config, model, tokenizer)
    built = {}
    original = task.build_model
    task.build_model = lambda fresh: built.setdefault("adapter", original(fresh))
    run(task, config)
    registers = built["adapter"].registers
    prompts = [tokenizer(t.split(" Answer: ")[0] + "\n\nAnswer:")["input_ids"] for t in CORPUS]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = greedy_generate_batch(model, prompts, 16, eos, "bidirectional", "bool", pad)
    for k in (2, 3, 4):
        stats = DecodeStats()
        drafted = greedy_generate_batch(model, prompts, 16, eos, "bidirectional", "bool", pad, registers, k, stats)
        assert drafted == plain, k
        single = [
            greedy_generate_batch(model, [p], 16, eos, "bidirectional", "bool", pad, registers, k)[0] for p in prompts
        ]
        assert single == plain, k
    assert stats.forwards < max(len(row) for row in plain)  # drafts were accepted


# ---------------------------------------------------------------- offline: local paths first-class, hub names fail fast

COMMANDS = {  # (argv, the key or flag of the model, of the local data) with hub names for both
    "train_sft": lambda model, data, out: (
        ["train_sft.py", "--config", "configs/text/gsm8k_mutor.yaml", f"model.name_or_path={model}",
         f"data.hf_name={data}", f"out_dir={out}"],
        "model.name_or_path", "data.jsonl",
    ),
    "eval/gsm8k.py": lambda model, data, out: (
        ["eval/gsm8k.py", "--ckpt", model, "--hf-name", data, "--out", f"{out}.json"], "--ckpt", "--data"
    ),
    "eval/math500.py": lambda model, data, out: (
        ["eval/math500.py", "--ckpt", model, "--hf-name", data, "--out", f"{out}.json"], "--ckpt", "--data"
    ),
}  # fmt: skip
NOT_CACHED = ("mutor-vision-tests/no-such-model", "mutor-vision-tests/no-such-data")


def run_offline(argv: list[str], tmp_path: Path, **env: str) -> tuple[int, str, float]:
    """Run a command as a new user would, with an empty Hugging Face cache: (exit code, stderr, seconds)."""
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and "PROXY" not in k.upper()}
    clean |= {"HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT), **env}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr, time.perf_counter() - start


def one_line_error(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{command}: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hub_names_offline_stop_at_once_naming_the_keys(command, tmp_path):
    # HF_HUB_OFFLINE=1 and names not in the (empty) cache: exit 4 in seconds, one line naming each
    # key or flag to set, no retries and no traceback (the libraries alone take 25-50 s, then a traceback).
    argv, model_key, data_key = COMMANDS[command](*NOT_CACHED, tmp_path / "run")
    code, stderr, seconds = run_offline(argv, tmp_path, HF_HUB_OFFLINE="1")
    line = one_line_error(stderr, command)
    assert code == 4 and seconds < 20, (code, seconds, stderr)
    assert model_key in line and data_key in line and "HF_HUB_OFFLINE=1" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.json").exists()


def test_no_connection_is_found_in_seconds_without_the_offline_variable(tmp_path):
    # No HF_HUB_OFFLINE, and the hub unreachable (here: through a proxy that refuses connections):
    # one short connect decides, then the same one-line error.
    import socket

    with socket.socket() as probe:  # a local port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = COMMANDS["train_sft"](*NOT_CACHED, tmp_path / "run")[0]
    code, stderr, seconds = run_offline(argv, tmp_path, HTTPS_PROXY=f"http://127.0.0.1:{port}")
    line = one_line_error(stderr, "train_sft")
    assert code == 4 and seconds < 20 and f"no connection to 127.0.0.1:{port}" in line, (code, seconds, line)
    assert "model.name_or_path" in line and "data.jsonl" in line


def test_missing_local_paths_are_one_line_naming_the_key(tmp_path, capsys):
    import train_sft

    config = str(ROOT / "configs" / "text" / "tiny_cpu.yaml")
    missing = [f"model.name_or_path={tmp_path / 'no_model'}", f"data.jsonl={tmp_path / 'no.jsonl'}"]
    assert train_sft.main(["--config", config, *missing, f"out_dir={tmp_path / 'run'}"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.name_or_path" in err and "data.jsonl" in err, err
    (tmp_path / "empty").mkdir()  # a directory without a model in it
    write_jsonl(tmp_path / "d.jsonl")
    local = [f"model.name_or_path={tmp_path / 'empty'}", f"data.jsonl={tmp_path / 'd.jsonl'}"]
    assert train_sft.main(["--config", config, *local, f"model.tokenizer={tmp_path / 'no_tok'}"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.tokenizer" in err, err
    assert train_sft.main(["--config", config, *local, f"out_dir={tmp_path / 'run'}"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.name_or_path" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_tiny_builder_and_config_train_then_evaluate_offline(tmp_path, capsys):
    # The documented offline path: python -m mutor_vision.text.tiny, train_sft.py with
    # configs/text/tiny_cpu.yaml, eval/gsm8k.py on the export (here with HF_HUB_OFFLINE=1).
    import train_sft
    from mutor_vision.text import tiny

    assert tiny.main(["--out", str(tmp_path / "tiny")]) == 0
    assert "model:" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "tiny").iterdir()} == {"model", "train.jsonl", "test.jsonl"}
    config = load_yaml(TextTrainConfig, ROOT / "configs" / "text" / "tiny_cpu.yaml")
    assert (config.model.name_or_path, config.data.jsonl, config.data.hf_name) == (
        "runs/text/tiny/model", "runs/text/tiny/train.jsonl", None
    )  # fmt: skip
    paths = [f"model.name_or_path={tmp_path / 'tiny' / 'model'}", f"data.jsonl={tmp_path / 'tiny' / 'train.jsonl'}"]
    argv = ["--config", str(ROOT / "configs" / "text" / "tiny_cpu.yaml"), *paths, f"out_dir={tmp_path / 'run'}"]
    assert train_sft.main([*argv, "epochs=1"]) == 0
    export = tmp_path / "run" / "checkpoints" / "step_00000008" / "export"
    assert (export / "registers.safetensors").is_file()
    out = tmp_path / "gsm8k.json"
    evaluate = ["eval/gsm8k.py", "--ckpt", str(export), "--data", str(tmp_path / "tiny" / "test.jsonl")]
    evaluate += ["--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]
    code, stderr, _ = run_offline(evaluate, tmp_path, HF_HUB_OFFLINE="1")
    assert code == 0, stderr
    results = json.loads(out.read_text())
    assert results["total"] == 16 and results["prompt_attention"] == "bidirectional"


def test_a_hub_name_in_the_local_cache_loads_offline(tokenizer, tmp_path, monkeypatch):
    # Offline, a hub name that is in the local Hugging Face cache is used from there (no network).
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mutor_vision.errors import InputError
    from mutor_vision.text.hub import from_pretrained, locate_model

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--mutor-vision-tests--cached"
    tiny_causal_lm(len(tokenizer)).save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = locate_model("mutor-vision-tests/cached", "model.name_or_path")
    assert source.local_files_only
    assert from_pretrained(AutoModelForCausalLM, source).config.vocab_size == len(tokenizer)
    assert len(from_pretrained(AutoTokenizer, source)) == len(tokenizer)
    with pytest.raises(InputError, match=r"model.name_or_path 'mutor-vision-tests/other'.*HF_HUB_OFFLINE=1"):
        locate_model("mutor-vision-tests/other", "model.name_or_path")


# ---------------------------------------------------------------- one register config for images and text


def text_config_data(**sections) -> dict:
    return {"model": {"name_or_path": "x"}, "data": {"jsonl": "x"}, **sections}


def test_the_adapter_defaults_are_the_config_defaults():
    # One source of defaults: the adapter, the text config and the YAML section all give the MuToR
    # authors' text recipe; images keep theirs, under the same keys.
    from dataclasses import fields

    from mutor_vision.config import from_dict
    from mutor_vision.core.config import RegisterConfig
    from mutor_vision.models import GPTConfig
    from mutor_vision.text.train import build_adapter

    config = from_dict(TextTrainConfig, text_config_data())
    model = tiny_causal_lm(32)
    assert MuToRAdapter(model).register_config == config.registers == TextRegisterConfig()
    assert build_adapter(model, config).register_config == config.registers
    r = config.registers
    assert (r.mode, r.d_max, r.weight, r.num_registers, r.register_fraction) == ("mutor1d", 4, 0.3, None, None)
    assert (r.prompt_attention, r.loss_normalization) == ("bidirectional", "sample")
    assert GPTConfig().registers == RegisterConfig() and RegisterConfig().weight == 0.5
    assert [f.name for f in fields(RegisterConfig)] == [f.name for f in fields(TextRegisterConfig)]


def old_method_yaml(tmp_path: Path, name: str) -> Path:
    """A shipped text config with the section and key names of older versions (``method:``, ``name``)."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "text" / f"gsm8k_{name}.yaml").read_text())
    registers = data.pop("registers")
    assert registers.pop("mode") == {"mutor": "mutor1d", "ntp": "ntp"}[name] and registers.pop("num_registers") is None
    data["method"] = {"name": name, **registers}
    path = tmp_path / f"old_{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["mutor", "ntp"])
def test_an_old_method_section_loads_as_the_registers_section(tmp_path, caplog, name):
    from mutor_vision.errors import ConfigError

    old = old_method_yaml(tmp_path, name)
    with caplog.at_level("WARNING", logger="mutor_vision.config"):
        loaded = load_yaml(TextTrainConfig, old)
    assert loaded == load_yaml(TextTrainConfig, ROOT / "configs" / "text" / f"gsm8k_{name}.yaml")
    lines = [r.getMessage() for r in caplog.records if "method: is the old name of registers:" in r.getMessage()]
    assert len(lines) == 1 and str(old) in lines[0] and "\n" not in lines[0], lines
    # Overrides with the old names apply to the old section; old and new names that disagree stop.
    assert load_yaml(TextTrainConfig, old, ["method.d_max=3"]).registers.d_max == 3
    with pytest.raises(ConfigError, match=r"method\.d_max .* registers\.d_max .*disagree"):
        load_yaml(TextTrainConfig, old, ["registers.d_max=3"])
    with pytest.raises(ConfigError, match=r"method\.d_maxx"):
        load_yaml(TextTrainConfig, old, ["method.d_maxx=3"])


def test_register_keys_of_the_other_modality_stop_with_one_line(capsys):
    from mutor_vision.config import from_dict, to_dict
    from mutor_vision.core.config import RegisterConfig
    from mutor_vision.errors import ConfigError
    from mutor_vision.models import GPTConfig

    text_bad = {"d_max_2d": 3, "edge": "drop", "mode": "mutor2d"}
    image_bad = {"prompt_attention": "bidirectional", "loss_normalization": "sample", "register_fraction": 0.5}
    for cls, build, bad, why in [
        (TextTrainConfig, lambda r: text_config_data(registers=r), text_bad, "images? only"),
        (GPTConfig, lambda r: {"registers": r}, image_bad, "text only"),
    ]:
        for key, value in bad.items():
            with pytest.raises(ConfigError) as error:
                from_dict(cls, build({key: value}))
            message = str(error.value)
            assert "\n" not in message and re.search(rf"registers: {key}: .*{why}", message), message
        # At their defaults they load (a recorded config lists every key, and loads back).
        config = from_dict(cls, build({}))
        assert from_dict(cls, to_dict(config)) == config
    with pytest.raises(ConfigError, match="registers: register_fraction: give num_registers"):
        from_dict(TextTrainConfig, text_config_data(registers={"num_registers": 4, "register_fraction": 0.5}))
    with pytest.raises(ConfigError, match="the image model takes a RegisterConfig"):
        GPTConfig(registers=TextRegisterConfig())
    with pytest.raises(ConfigError, match="takes a TextRegisterConfig"):
        MuToRAdapter(tiny_causal_lm(32), RegisterConfig(mode="mutor1d"))
    import train_sft

    config = str(ROOT / "configs" / "text" / "gsm8k_mutor.yaml")
    assert train_sft.main(["--config", config, "registers.d_max_2d=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "registers: d_max_2d: image only" in err, err


def test_a_register_count_and_valid_slots_reach_the_text_layout():
    # num_registers: R per sample, at most the batch's longest answer; valid_slots_only draws the
    # slots whose target exists first (the core's rule, as for images).
    model = tiny_causal_lm(32)
    _, prompt_len, answer_len = worked_batch()
    generator = torch.Generator().manual_seed(0)
    layout = MuToRAdapter(model, TextRegisterConfig(num_registers=2)).layout(prompt_len, answer_len, 8, generator)
    assert layout.num_registers == 2
    many = MuToRAdapter(model, TextRegisterConfig(num_registers=99))
    assert many.layout(prompt_len, answer_len, 8).num_registers == 5  # the longest answer's slots

    def all_valid(valid_slots_only: bool, seed: int) -> bool:  # d <= 3: each row has a valid slot
        adapter = MuToRAdapter(model, TextRegisterConfig(num_registers=1, d_max=3, valid_slots_only=valid_slots_only))
        return bool(adapter.layout(prompt_len, answer_len, 8, torch.Generator().manual_seed(seed)).valid.all())

    assert all(all_valid(True, seed) for seed in range(20))
    assert not all(all_valid(False, seed) for seed in range(20))


def test_an_old_text_checkpoint_resumes_and_exports_write_the_new_names(tokenizer, tmp_path, caplog):
    # A checkpoint of an older version recorded method: (name: mutor) and none of the keys added
    # since: the resume reads it as registers: and goes on; the export records the new key names.
    data = write_jsonl(tmp_path / "train.jsonl", rows=8)
    first = tiny_run_config(data, tmp_path / "run", "epochs=1", "global_batch_size=4", "micro_batch_size=4")
    assert train_text(first, model=tiny_causal_lm(len(tokenizer)), tokenizer=tokenizer).step == 2
    state_path = tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_path.read_text())
    registers = state["config"].pop("registers")
    state["config"]["method"] = {"name": "mutor"} | {
        k: registers[k] for k in ("d_max", "weight", "register_fraction", "prompt_attention", "loss_normalization")
    }
    state_path.write_text(json.dumps(state))
    more = tiny_run_config(data, tmp_path / "run", "epochs=2", "global_batch_size=4", "micro_batch_size=4")
    with caplog.at_level("WARNING", logger="mutor_vision.config"):
        result = train_text(
            more, resume="auto", allow_change=["epochs"], model=tiny_causal_lm(len(tokenizer)), tokenizer=tokenizer
        )
    assert result.step == 4 and result.reason == "completed"
    assert any("step_00000002: method: is the old name of registers:" in r.getMessage() for r in caplog.records)
    info = json.loads((result.checkpoint / "export" / "mutor_text.json").read_text())
    assert info["mode"] == "mutor1d" and "name" not in info and "d_max_2d" not in info
    assert {k: info[k] for k in ("d_max", "weight", "num_registers", "prompt_attention")} == {
        "d_max": 4, "weight": 0.3, "num_registers": None, "prompt_attention": "bidirectional"
    }  # fmt: skip


def test_an_old_text_export_is_read_under_the_new_names(tmp_path):
    from mutor_vision.errors import ConfigError
    from mutor_vision.text.evaluate import drafting_registers
    from mutor_vision.text.export import INFO, read_text_info

    old = {"base_model": "m", "lora": False, "attn_implementation": "sdpa", "prompt_template": "Q: {prompt}"}
    old |= {"name": "mutor", "d_max": 4, "weight": 0.3, "register_fraction": None, "prompt_attention": "bidirectional"}
    (tmp_path / INFO).write_text(json.dumps(old))
    info = read_text_info(tmp_path)
    assert info["mode"] == "mutor1d" and "name" not in info
    assert {k: v for k, v in info.items() if k != "mode"} == {k: v for k, v in old.items() if k != "name"}
    (tmp_path / INFO).write_text(json.dumps(old | {"name": "ntp"}))
    info = read_text_info(tmp_path)
    assert info["mode"] == "ntp"
    with pytest.raises(ConfigError, match="trained without registers"):
        drafting_registers(tmp_path, info, tiny_causal_lm(32), 2)
