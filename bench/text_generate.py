"""Text evaluation speed: problems/s of batched greedy decoding against one prompt at a time.

    python bench/text_generate.py --out bench/results/text_generate_cpu.json

A tiny random Llama (or ``--model`` a local Hugging Face directory) and GSM8K-like prompts; both
ways decode the same prompts to the same outputs (a row stops at EOS or ``--max-new-tokens``; a
batch runs until its last row stops), with the bidirectional prefill of the MuToR recipe. The goal:
batch 32 >= 8x one at a time.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.text.generate import generate_texts

QUESTIONS = [
    "Tom has {a} apples and buys {b} more. How many apples does he have?",
    "A box holds {a} eggs. How many eggs are in {b} boxes?",
    "Sara reads {a} pages a day for {b} days. How many pages does she read?",
]


def tiny_setup(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mutor_vision.text.data import word_tokenizer

    corpus = [q.format(a=a, b=b) for q in QUESTIONS for a in range(20) for b in range(20)] + ["Question: Answer:"]
    tokenizer = word_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: a tiny random Llama)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_setup(args.hidden, args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    prompts = [
        "Question: " + QUESTIONS[i % 3].format(a=i % 17 + 1, b=i % 7 + 2) + "\n\nAnswer:" for i in range(args.prompts)
    ]
    rows = {}
    for name, batch in (("one_at_a_time", 1), ("batched", args.batch_size)):
        generate_texts(model, tokenizer, prompts[:2], 2, "bidirectional", batch_size=batch, show_progress=False)
        start = time.perf_counter()
        generate_texts(model, tokenizer, prompts, args.max_new_tokens, "bidirectional", batch_size=batch,
                       show_progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        rows[name] = {"batch_size": batch, "seconds": seconds, "problems_per_s": args.prompts / seconds}
    ratio = rows["batched"]["problems_per_s"] / rows["one_at_a_time"]["problems_per_s"]
    for name, row in rows.items():
        print(
            f"{name:<14} batch {row['batch_size']:>3}  {row['seconds']:7.2f} s  {row['problems_per_s']:8.2f} problems/s"
        )
    print(f"ratio {ratio:.1f}x (goal >= 8x)")
    save(args.out, {**provenance("text_generate", device), "config": vars(args), "rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
