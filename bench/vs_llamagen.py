"""This project's GPT-B against LlamaGen's own code in one process: equality, sampling and training.

    python bench/vs_llamagen.py --llamagen DIR --out bench/results/vs_llamagen_h100.json   # on a GPU
    python bench/vs_llamagen.py --llamagen DIR --what equality --out bench/results/vs_llamagen_cpu.json
    LLAMAGEN_REF=DIR python bench/gpu_check.py          # the same, as the check's last stage

``DIR`` is a checkout of LlamaGen (github.com/FoundationVision/LlamaGen): the folder that holds
``autoregressive/models/gpt.py`` and ``generate.py``. Nothing of it is vendored here.

- equality (CPU or GPU, fp32): the same weights in both (LlamaGen's, loaded into ours through the
  official-file path): the training forward's logits (max |difference| against max |logit|), and
  the codes of greedy sampling with CFG 2.0 from each side's own ``generate``.
- sampling (CUDA): GPT-B, 256 tokens, CFG 2.0, bf16 weights, at each ``--sample-batches``: LlamaGen's
  ``generate`` eager and with the compile its ``sample_c2i.py`` applies
  (``torch.compile(model, mode="reduce-overhead", fullgraph=True)``), against ours eager and
  ``generate(compile=True)``. Both models hold the same weights (LlamaGen's, loaded into ours).
- training (CUDA): one step (forward, backward, fused AdamW) under bf16 autocast at ``--train-batch``,
  LlamaGen's next-token step against ours (next-token and MuToR-2D with 80 registers), eager,
  interleaved repeats, medians.

Ratios are what count: both sides run on the same GPU in the same process. Random weights: speed only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import median_time, provenance, save, wall_time  # bench/common.py (the script's folder is on sys.path)

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate

CFG = 2.0


def llamagen_gpt_b(root: Path, dropout: float = 0.0, device: str = "cuda"):
    """LlamaGen's GPT-B (c2i, 16×16 grid, VQ-16 vocabulary) from the checkout at ``root``, on ``device``."""
    sys.path.insert(0, str(root))
    from autoregressive.models.gpt import GPT_models

    model = GPT_models["GPT-B"](
        vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i",
        resid_dropout_p=dropout, ffn_dropout_p=dropout, token_dropout_p=dropout,
    )  # fmt: skip
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)  # LlamaGen zero-inits its head: give the logits some shape
    return model.to(device)


def equality(root: Path, device: str, batch: int = 4) -> dict:
    """The same weights on both sides: logits of the training forward, and greedy CFG codes."""
    sys.path.insert(0, str(root))
    from autoregressive.models.generate import generate as llamagen_generate

    torch.manual_seed(0)
    theirs = llamagen_gpt_b(root, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llamagen_b.pt"
        torch.save({"model": theirs.state_dict()}, path)
        ours = GPT.from_pretrained(path, size="GPT-B").to(device).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16384, (batch, 256), generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    with torch.no_grad():
        theirs.train()  # LlamaGen's training forward (dropout 0 here) is the one that takes whole sequences
        theirs.cls_embedding.dropout_prob = 0.0
        their_logits, _ = theirs(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)
        theirs.eval()
        our_logits = ours(tokens, labels).logits
        their_codes = llamagen_generate(theirs, labels, 256, cfg_scale=CFG, top_k=0, sample_logits=False)
    our_codes = generate(ours, labels, SamplingConfig(cfg_scale=CFG, temperature=0.0)).flatten(1)
    row = {
        "device": device,
        "batch": batch,
        "logits_max_abs_diff": (our_logits - their_logits.float()).abs().max().item(),
        "logits_max_abs": their_logits.abs().max().item(),
        "greedy_cfg_codes_equal": bool(torch.equal(our_codes, their_codes.to(our_codes.device))),
        "greedy_cfg_codes_agreeing": (our_codes == their_codes).float().mean().item(),
    }
    print(f"equality: {row}", flush=True)
    return row


def sampling(root: Path, batches: list[int], repeats: int) -> dict[str, dict]:
    sys.path.insert(0, str(root))
    from autoregressive.models.generate import generate as llamagen_generate

    torch.manual_seed(0)
    theirs = llamagen_gpt_b(root).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llamagen_b.pt"
        torch.save({"model": theirs.state_dict()}, path)
        ours = GPT.from_pretrained(path, size="GPT-B").cuda().eval()
    theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    ours.rope_cos, ours.rope_sin = ours.rope_cos.float(), ours.rope_sin.float()  # as eval/fid.py keeps RoPE
    theirs_compiled = torch.compile(theirs, mode="reduce-overhead", fullgraph=True)
    rows = {}
    for batch in batches:
        labels = torch.arange(batch, device="cuda")
        runs = {
            "llamagen_eager": lambda m=theirs, c=labels: llamagen_generate(m, c, 256, cfg_scale=CFG, top_k=0),
            "llamagen_compiled": lambda m=theirs_compiled, c=labels: llamagen_generate(
                m, c, 256, cfg_scale=CFG, top_k=0
            ),
            "ours_eager": lambda c=labels: generate(ours, c, SamplingConfig(cfg_scale=CFG)),
            "ours_compiled": lambda c=labels: generate(ours, c, SamplingConfig(cfg_scale=CFG), compile=True),
        }
        row = {f"{name}_images_per_s": batch / median_time(fn, repeats, warmup=2) for name, fn in runs.items()}
        row["ours_compiled_over_llamagen_compiled"] = (
            row["ours_compiled_images_per_s"] / row["llamagen_compiled_images_per_s"]
        )
        row["ours_eager_over_llamagen_eager"] = row["ours_eager_images_per_s"] / row["llamagen_eager_images_per_s"]
        rows[f"batch_{batch}"] = row
        print(f"sampling batch {batch}: {row}", flush=True)
        ours.clear_caches()
    return rows


def training(root: Path, batch: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16384, (batch, 256), generator=g).cuda()
    labels = torch.randint(0, 1000, (batch,), generator=g).cuda()
    torch.manual_seed(0)
    models = {"llamagen_ntp": (llamagen_gpt_b(root, dropout=0.1).train(), None)}
    for name, registers in [("ours_ntp", RegisterConfig(mode="ntp")), ("ours_mutor2d_80", RegisterConfig(
            mode="mutor2d", num_registers=80))]:  # fmt: skip
        models[name] = (GPT(GPTConfig(size="GPT-B", registers=registers)).cuda().train(), registers)
    optimizers = {
        k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True) for k, (m, _) in models.items()
    }

    def step(name: str) -> None:
        model, registers = models[name]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if registers is None:  # LlamaGen's training forward: inputs x_1..x_{N-1}, targets x_1..x_N
                _, loss = model(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)
            else:
                layout = model.register_layout(batch, generator=g, device="cuda")
                mask = None if layout is None else model.attention_mask(layout)
                loss = model(tokens, labels, layout, mask, return_loss=True).loss["loss"]
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in models:
        for _ in range(2):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name in models:
            times[name].append(wall_time(lambda n=name: step(n)))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ideal = (256 + 80) / 256
    row = {
        "batch": batch,
        "step_s": medians,
        "images_per_s": {name: batch / s for name, s in medians.items()},
        "ours_ntp_over_llamagen_ntp_time": medians["ours_ntp"] / medians["llamagen_ntp"],
        "ours_mutor2d_80_over_ntp_per_ideal": medians["ours_mutor2d_80"] / medians["ours_ntp"] / ideal,
    }
    print(f"training: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamagen", type=Path, default=os.environ.get("LLAMAGEN_REF"), help="LlamaGen checkout")
    parser.add_argument("--what", default="equality,sampling,training", help="parts, comma-separated")
    parser.add_argument("--sample-batches", default="32,64")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.llamagen is None or not (args.llamagen / "autoregressive" / "models" / "gpt.py").is_file():
        raise SystemExit(f"--llamagen (or LLAMAGEN_REF): {args.llamagen} holds no autoregressive/models/gpt.py")
    what = args.what.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and {"sampling", "training"} & set(what):
        raise SystemExit("bench/vs_llamagen.py: sampling and training need CUDA (both sides compile for the GPU)")
    result = {**provenance("vs_llamagen", device), "config": {k: str(v) for k, v in vars(args).items()}}
    if "equality" in what:
        result["equality"] = equality(args.llamagen, device)
        save(args.out, result)
    if "sampling" in what:
        result["sampling"] = sampling(args.llamagen, [int(b) for b in args.sample_batches.split(",")], args.repeats)
        save(args.out, result)
    if "training" in what:
        torch.compiler.reset()
        result["training"] = training(args.llamagen, args.train_batch, args.repeats * 3)
    save(args.out, result)


if __name__ == "__main__":
    main()
