"""GSM8K accuracy with greedy decoding and numeric answer comparison.

    python eval/gsm8k.py --ckpt runs/text/gsm8k_mutor/checkpoints/step_00003735/export --out acc.json
    python eval/gsm8k.py --ckpt /models/gemma-2b --hf-name gsm8k --hf-config main --split test --out acc.json

An export of train_sft.py brings its base model, LoRA flag, prompt template and prompt attention:
a model trained with a bidirectional prompt is prefilled bidirectionally. Answers are compared as
numbers ("18.0" == "18", "1,000" == "1000").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mutor_vision.text.adapter import MASK_FORMS
from mutor_vision.text.answers import answers_match, extract_answer
from mutor_vision.text.config import GSM8K_PROMPT
from mutor_vision.text.data import read_records
from mutor_vision.text.export import model_directory, read_text_info
from mutor_vision.text.generate import greedy_generate


def load(ckpt: Path, base_model: str | None, attn: str | None):
    """(model, tokenizer, info) from a train_sft export or a plain Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recorded = read_text_info(ckpt)
    info = recorded or {}
    attn = attn or info.get("attn_implementation", "sdpa")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model_dir = model_directory(ckpt, recorded)
    if info.get("lora"):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            base_model or info["base_model"], dtype=dtype, attn_implementation=attn
        )
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer, info | {"attn_implementation": attn}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--base-model", default=None, help="override the base model recorded in a LoRA export")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--data", default=None, help="a local JSONL file with question/answer fields")
    p.add_argument("--hf-name", default=None)
    p.add_argument("--hf-config", default="main")
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    model, tokenizer, info = load(args.ckpt, args.base_model, args.attn_implementation)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    records = read_records(args.data, None if args.data else args.hf_name or "gsm8k", args.hf_config, args.split)
    records = records[: args.limit] if args.limit else records
    template = info.get("prompt_template", GSM8K_PROMPT)
    prompt_attention = info.get("prompt_attention", "causal")
    mask_form = MASK_FORMS.get(info["attn_implementation"], "bool")
    rows, correct = [], 0
    for record in tqdm(records, desc="gsm8k"):
        prompt_ids = tokenizer(template.format(prompt=record["question"]))["input_ids"]
        tokens = greedy_generate(
            model, prompt_ids, args.max_new_tokens, tokenizer.eos_token_id, prompt_attention, mask_form
        )
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        ok = answers_match(text, record["answer"])
        correct += ok
        predicted = extract_answer(text)
        rows.append({"prediction": text, "extracted": None if predicted is None else str(predicted), "correct": ok})
    results = {
        "accuracy": correct / max(len(records), 1),
        "correct": correct,
        "total": len(records),
        "checkpoint": str(args.ckpt),
        "prompt_attention": prompt_attention,
        "max_new_tokens": args.max_new_tokens,
        "samples": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}))
    return results


if __name__ == "__main__":
    main()
