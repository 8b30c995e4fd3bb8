"""Register drafting (self-speculative decoding): tokens per forward and wall-clock speed-up.

    python bench/speculative.py --out bench/results/speculative_cpu.json
    python bench/speculative.py --device cuda --out bench/results/speculative_h100.json  # text model trains on CPU
    python bench/speculative.py --image-export runs/demo/mutor2d-seed0/checkpoints/step_00000600/export ...

Three measurements, each against plain KV-cache decoding in the same process:

- ``images``: a model trained with MuToR-2D — by default the demo's (``make demo`` first; D = 4, so
  k <= 3) — greedy and temperature 1.0, with and without CFG, at batch 1 and 8;
- ``text``: a tiny Llama trained here for a few minutes with MuToR-1D (d_max 4) on a synthetic
  arithmetic task, greedy, k = 2..4, at batch 1 and 8; every drafted output is checked equal to
  plain greedy decoding;
- ``verify_cost``: GPT-B with random weights: the time of one verification forward (k tokens and
  their registers) against one plain decode step — what a forward costs when drafts are rejected.

Acceptance is what trained registers give; speed-up is acceptance net of the verify cost. Rows of a
batch advance together (the fewest accepted drafts of any row), so acceptance falls with the batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import median_time, provenance, save  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.core.drafting import DecodeStats
from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate, generate_drafted

ROOT = Path(__file__).resolve().parent.parent


def images(export: Path, repeats: int, device: torch.device, batches: list[int], cfg_scales: list[float]) -> list[dict]:
    model = GPT.from_pretrained(export).to(device).eval()
    rows = []
    for batch in batches:
        labels = torch.arange(batch, device=device) % model.config.num_classes
        for temperature in (0.0, 1.0):
            for cfg in cfg_scales:
                settings = SamplingConfig(cfg_scale=cfg, temperature=temperature, seed=0)
                # Every variant warms up before it is timed: the first calls of a setting pay its start-up
                # (a cold baseline once made two speed-ups meaningless: bench/results/struck.json).
                plain = median_time(lambda s=settings, lab=labels: generate(model, lab, s), repeats, warmup=2)
                for k in (2, 3):
                    stats = DecodeStats()
                    drafted = median_time(lambda s=settings, lab=labels, k=k, st=stats: generate_drafted(
                        model, lab, s, k, st), repeats, warmup=2)  # fmt: skip
                    rows.append({
                        "batch": batch, "temperature": temperature, "cfg_scale": cfg, "draft_tokens": k,
                        "tokens_per_forward": stats.tokens_per_forward,
                        "plain_s": plain, "drafted_s": drafted, "speed_up": plain / drafted,
                    })  # fmt: skip
                    print("images", json.dumps(rows[-1]))
    return rows


def text(minutes_budget_steps: int, repeats: int, device: torch.device) -> list[dict]:
    """Train a tiny Llama with MuToR-1D on a synthetic task (on CPU), then draft with its registers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mutor_vision.config import load_yaml
    from mutor_vision.text.config import TextTrainConfig
    from mutor_vision.text.data import word_tokenizer
    from mutor_vision.text.generate import greedy_generate_batch
    from mutor_vision.text.train import TextTask
    from mutor_vision.training import loop

    records = []
    for a in range(2, 40):
        for b in range(2, 12):
            steps = " ".join(f"{a} + {a * i} = {a * (i + 1)} ." for i in range(1, b))
            records.append({"question": f"count by {a} to {a * b}", "answer": f"{steps} #### {a * b}"})
    tokenizer = word_tokenizer([r["question"] + " " + r["answer"] for r in records], split_punctuation=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, attn_implementation="sdpa",
    ))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in records))
        config = load_yaml(TextTrainConfig, ROOT / "configs" / "text" / "gsm8k_mutor.yaml", [
            f"data.jsonl={data}", "data.hf_name=null", "model.name_or_path=synthetic", f"out_dir={tmp}/run",
            "epochs=1000", "global_batch_size=16", "micro_batch_size=16", "optim.lr=2e-3", "optim.warmup_ratio=0.02",
            "tensorboard=false", "save_every=100000", "data.max_length=256", "device=cpu", "log_every=100",
        ])  # fmt: skip
        task = TextTask(config, model, tokenizer)
        task.total_steps = minutes_budget_steps
        built = {}
        build = task.build_model
        task.build_model = lambda fresh: built.setdefault("adapter", build(fresh))
        loop.run(task, config)
    model.to(device).eval()
    registers = built["adapter"].registers.to(device)
    test = [r for i, r in enumerate(records) if i % 7 == 0][:16]
    prompts = [tokenizer(config.data.prompt_template.format(prompt=r["question"]))["input_ids"] for r in test]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for batch in (1, 8):
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

        def decode(k: int, stats: DecodeStats | None = None, chunks=chunks) -> list:
            return [out for chunk in chunks for out in greedy_generate_batch(
                model, chunk, 64, eos, "bidirectional", "bool", pad, registers, k, stats)]  # fmt: skip

        reference = decode(1)
        plain = median_time(lambda decode=decode: decode(1), repeats)
        for k in (2, 3, 4):
            stats = DecodeStats()
            assert decode(k, stats) == reference, f"drafted output differs at k={k}"
            drafted = median_time(lambda k=k, decode=decode: decode(k), repeats)
            rows.append({
                "batch": batch, "draft_tokens": k, "tokens_per_forward": stats.tokens_per_forward,
                "plain_s": plain, "drafted_s": drafted, "speed_up": plain / drafted, "outputs_equal_plain": True,
            })  # fmt: skip
            print("text", json.dumps(rows[-1]))
    return rows


@torch.no_grad()
def verify_cost(repeats: int, device: torch.device, batches: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(size="GPT-B", registers=RegisterConfig(mode="mutor2d", d_max_2d=4))).to(device).eval()
    rows = []
    for batch in batches:
        model.setup_caches(batch)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        model.prefill(labels)
        tokens = torch.zeros(batch, 3, dtype=torch.long, device=device)
        step = torch.tensor([10], device=device)
        plain = median_time(lambda tokens=tokens, step=step: model.decode(tokens[:, :1], step), repeats)
        for k in (2, 3):
            positions = torch.arange(10, 10 + k, device=device)
            anchors = positions.repeat_interleave(k - 1)
            offsets = torch.arange(2, k + 1, device=device).repeat(k)
            embeds = model.tok_embeddings(tokens[:, :k])
            verify = median_time(
                lambda e=embeds, p=positions, a=anchors, o=offsets: model.extend(e, p, a, a + o - 1), repeats
            )
            rows.append({"batch": batch, "draft_tokens": k, "decode_step_s": plain, "verify_step_s": verify,
                         "verify_over_decode": verify / plain})  # fmt: skip
            print("verify_cost", json.dumps(rows[-1]))
        model.clear_caches()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ROOT / "runs" / "demo" / "mutor2d-seed0" / "checkpoints" / "step_00000600" / "export"
    parser.add_argument("--image-export", type=Path, default=default)
    parser.add_argument("--text-steps", type=int, default=600, help="training steps of the synthetic text model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8", help="batch sizes of the image and verify-cost rows")
    parser.add_argument("--parts", default="images,text,verify_cost", help="which measurements to run")
    parser.add_argument("--cfg-scales", default="1.0,2.0", help="CFG scales of the image rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {**provenance("speculative", device), "config": {k: str(v) for k, v in vars(args).items()}}
    parts, batches = args.parts.split(","), [int(b) for b in args.batches.split(",")]
    if "images" in parts and args.image_export.is_dir():
        cfg_scales = [float(c) for c in args.cfg_scales.split(",")]
        result["images"] = images(args.image_export, args.repeats, device, batches, cfg_scales)
    elif "images" in parts:
        print(f"no image export at {args.image_export}: run `make demo` first (skipping the image rows)")
        result["images_skipped"] = f"no image export at {args.image_export} (make demo first)"
    if "text" in parts:
        result["text"] = text(args.text_steps, args.repeats, device)
    if "verify_cost" in parts:
        result["verify_cost"] = verify_cost(args.repeats, device, batches)
    save(args.out, result)


if __name__ == "__main__":
    main()
