"""Before and after a refactor: the same outputs, bit for bit. Digests (sha256) of sampled codes, model
outputs and gradients, evaluation outputs and trained weights, from tiny models on the CPU.

Run it in the checkout before the change and in the one after, then compare:

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python /path/to/bench/equivalence.py --out /tmp/before.json)
    python bench/equivalence.py --out /tmp/after.json
    python bench/equivalence.py --compare /tmp/before.json /tmp/after.json \\
        --out bench/results/equivalence_cpu_issue34.json

It imports the library of the folder it runs in. Cases that a checkout cannot run are recorded
as missing, and ``--compare`` lists them. Written for the sampling and evaluation refactor of
issue 34: where the two APIs differ (``generate``'s keywords at 70c1a3c, the one ``SamplingConfig``
after), ``_sample`` and ``_compiled_codes`` speak each.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.getcwd())  # the checkout it runs in: its mutor_vision, tokenizer/ and eval/
sys.path.insert(1, str(Path(__file__).resolve().parent))

from common import provenance, save

from mutor_vision.models import GPT, GPTConfig, RegisterConfig, SamplingConfig, generate
from mutor_vision.models import sampling as sampling_module

OLD_API = "draft_tokens" in inspect.signature(generate).parameters  # generate(..., draft_tokens, use_cache, **settings)
Digests = dict[str, str]


def digest(*arrays: Any) -> str:
    """sha256 over the bytes of tensors / arrays / bytes, with their dtypes and shapes."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, bytes):
            h.update(a)
            continue
        a = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tiny_model(registers: RegisterConfig, grid: int = 4, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        size=None, n_layer=2, n_head=2, dim=64, vocab_size=16, num_classes=5, grid_size=grid,
        token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, attention="sdpa",
        registers=registers,
    )  # fmt: skip
    model = GPT(config).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # the zero head of a fresh model would draw uniformly
    return model


# ---------------------------------------------------------------- sampling


def _sample(model: GPT, labels: torch.Tensor, sampling: SamplingConfig, **how: Any) -> torch.Tensor:
    """``generate`` in the API of this checkout. ``how``: uniform, draft_tokens, stats, use_cache."""
    draft_tokens, stats, use_cache = how.pop("draft_tokens", 1), how.pop("stats", None), how.pop("use_cache", True)
    if OLD_API:
        return generate(model, labels, sampling, draft_tokens=draft_tokens, stats=stats, use_cache=use_cache, **how)
    if draft_tokens > 1:
        return sampling_module.generate_drafted(model, labels, sampling, draft_tokens, stats)
    if not use_cache:
        from decode_variants import generate_without_cache  # bench/decode_variants.py

        return generate_without_cache(model, labels, sampling, how.get("uniform"))
    return generate(model, labels, sampling, **how)


def _compiled_codes(model: GPT, labels: torch.Tensor, sampling: SamplingConfig, uniform: torch.Tensor) -> torch.Tensor:
    """The CUDA-graph decode's compiled step, run by inductor on the CPU (no CUDA graphs there): the
    flex decode attention compiled, as ``generate(compile=True)`` runs it on CUDA."""
    if OLD_API:
        from mutor_vision.models.decode import DecodeAttention

        step = torch.compile(sampling_module.next_codes, fullgraph=True, dynamic=False)
        guided = sampling.cfg_scale != 1.0
        rows = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if guided else labels
        codes = torch.zeros(labels.shape[0], model.config.num_tokens, dtype=torch.long)
        by_step = uniform.t().contiguous()
        with torch.no_grad():
            model.setup_caches(rows.shape[0])
            logits = model.prefill(rows)
            logits = sampling_module.guide(logits, sampling.cfg_scale) if guided else logits
            t = sampling
            codes[:, 0] = sampling_module.sample_logits(logits, t.temperature, t.top_k, t.top_p, uniform=by_step[0])
            sampling_module.decode_loop(model, codes, by_step, sampling, guided, DecodeAttention("flex"), 1, step)
            model.clear_caches()
        return codes.view(labels.shape[0], model.config.grid_size, -1)
    codes = generate(model, labels, sampling, uniform, compile=True)  # on the CPU: inductor, no CUDA graphs
    model.clear_caches()
    return codes


def sampling_cases() -> Digests:
    out: Digests = {}
    plain = tiny_model(RegisterConfig(mode="ntp"))
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    for cfg in (1.0, 2.0):
        for name, settings in {
            "greedy": dict(temperature=0.0),
            "sampled": dict(temperature=1.0),
            "topk_topp": dict(temperature=0.9, top_k=5, top_p=0.9),
        }.items():
            sampling = SamplingConfig(cfg_scale=cfg, seed=3, **settings)
            out[f"codes/eager/{name}/cfg{cfg}"] = digest(_sample(plain, labels, sampling))
            out[f"codes/no_cache/{name}/cfg{cfg}"] = digest(_sample(plain, labels, sampling, use_cache=False))
    uniform = sampling_module.sample_uniforms(7, [3, 1, 4, 1, 5, 9], plain.config.num_tokens)
    sampling = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=8)
    out["codes/eager/fixed_uniforms/cfg1.5"] = digest(_sample(plain, labels, sampling, uniform=uniform))
    out["uniforms/seed7"] = digest(uniform)

    drafter = tiny_model(RegisterConfig(mode="mutor1d", d_max=4, num_registers=None), seed=1)
    for k in (2, 3, 4):
        for cfg, temperature in ((1.0, 0.0), (2.0, 0.0), (1.0, 1.0), (2.0, 1.0)):
            from mutor_vision.core.drafting import DecodeStats

            stats = DecodeStats()
            sampling = SamplingConfig(cfg_scale=cfg, temperature=temperature, seed=5)
            codes = _sample(drafter, labels, sampling, draft_tokens=k, stats=stats)
            out[f"codes/drafted/k{k}/cfg{cfg}/t{temperature}"] = digest(codes, torch.tensor([stats.forwards]))
    return out


def compiled_cases() -> Digests:
    out: Digests = {}
    grid16 = tiny_model(RegisterConfig(mode="ntp"), grid=16, seed=2)  # four 64-slot flex blocks
    labels = torch.tensor([0, 1, 2])
    uniform = sampling_module.sample_uniforms(11, range(3), grid16.config.num_tokens)
    for name, sampling in {
        "greedy/cfg2.0": SamplingConfig(cfg_scale=2.0, temperature=0.0),
        "sampled/cfg1.0": SamplingConfig(cfg_scale=1.0, temperature=1.0, top_k=10),
    }.items():
        out[f"codes/compiled_cpu/{name}"] = digest(_compiled_codes(grid16, labels, sampling, uniform))
        out[f"codes/eager_grid16/{name}"] = digest(_sample(grid16, labels, sampling, uniform=uniform))
    return out


# ---------------------------------------------------------------- the model: logits, losses, gradients


def _loss_parts(model: GPT, *args: Any) -> dict[str, torch.Tensor]:
    output = model(*args, return_loss=True)
    return output if isinstance(output, dict) else output.loss  # 70c1a3c returned the parts as a dict


def model_cases() -> Digests:
    out: Digests = {}
    for mode, registers in {
        "ntp": RegisterConfig(mode="ntp"),
        "mutor2d": RegisterConfig(mode="mutor2d", d_max_2d=2, num_registers=8),
    }.items():
        model = tiny_model(registers, grid=4)
        model.train()
        g = torch.Generator().manual_seed(4)
        tokens, labels = torch.randint(0, 16, (3, 16), generator=g), torch.randint(0, 5, (3,), generator=g)
        layout = model.register_layout(3, generator=torch.Generator().manual_seed(9))
        torch.manual_seed(1)  # dropout
        with torch.no_grad():
            output = model(tokens, labels, layout)
        out[f"forward/{mode}/logits"] = digest(output.logits)
        if output.register_logits is not None:
            out[f"forward/{mode}/register_logits"] = digest(output.register_logits)
        for chunk in (0, 5):
            model.config.head_chunk_size = chunk
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            parts = _loss_parts(model, tokens, labels, layout)
            parts["loss"].backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            out[f"loss/{mode}/chunk{chunk}"] = digest(*(parts[k] for k in sorted(parts)))
            out[f"grads/{mode}/chunk{chunk}"] = digest(*grads)
        model.config.head_chunk_size = 0
        if layout is not None:
            model.config.attention = "flex"  # the BlockMask path, forward only on the CPU
            with torch.no_grad():
                flex = model(tokens, labels, layout, model.attention_mask(layout, requires_grad=False))
            out[f"forward/{mode}/flex_logits_close"] = str(bool(torch.allclose(flex.logits, output.logits, atol=1e-5)))
    return out


# ---------------------------------------------------------------- training


def training_cases(root: Path) -> Digests:
    from safetensors.torch import load_file

    from mutor_vision.config import load_yaml
    from mutor_vision.shards import write_synthetic_shards
    from mutor_vision.training.c2i import train
    from mutor_vision.training.config import TrainConfig

    shards = root / "shards"
    write_synthetic_shards(shards, num_shards=4, per_shard=16, grid=8, vocab_size=16, num_classes=10)
    tiny = Path("configs/c2i/tiny_cpu.yaml")
    out: Digests = {}
    for name, overrides in {
        "mutor2d": [],
        "mutor2d_chunked_head": ["model.head_chunk_size=48"],
        "ntp": ["model.registers.mode=ntp"],
        "mutor2d_ema": ["ema.enabled=true"],
    }.items():
        run = root / name
        base = [f"data.root={shards}", f"out_dir={run}", "tensorboard=false", "steps=6", "save_every=6"]
        result = train(load_yaml(TrainConfig, tiny, [*base, *overrides]))
        export = run / "checkpoints" / "step_00000006"
        weights = {}
        for folder in ("export", "export_ema"):
            if (export / folder).is_dir():
                tensors = load_file(export / folder / "model.safetensors")
                weights.update({f"{folder}/{k}": v for k, v in tensors.items()})
        out[f"train/{name}/weights"] = digest(*(weights[k] for k in sorted(weights)))
        out[f"train/{name}/losses"] = digest(np.array(result.losses))
    return out


# ---------------------------------------------------------------- evaluation


def evaluation_cases(root: Path) -> Digests:
    from eval import fid as fid_cli
    from mutor_vision.evaluation import INCEPTION_FILE, save_random_inception_weights
    from mutor_vision.models.checkpoint import save_export
    from tokenizer import PaletteTokenizer

    colors = np.array([[0, 0, 0], [255, 255, 255], [200, 30, 30], [30, 200, 30], [30, 30, 200], [240, 200, 20]])
    colors = colors.astype(np.uint8)
    palette = PaletteTokenizer(colors)
    palette.save(root / "palette.json")
    record = {"kind": "palette", "path": str(root / "palette.json"), "checksum": palette.checksum}
    torch.manual_seed(0)
    plain = GPT(
        GPTConfig(size=None, n_layer=2, n_head=2, dim=64, vocab_size=6, num_classes=3, grid_size=8,
                  registers=RegisterConfig(mode="ntp"))
    )  # fmt: skip
    torch.nn.init.normal_(plain.output.weight, std=0.5)
    save_export(root / "plain", plain.state_dict(), plain.config, tokenizer=record)
    torch.manual_seed(1)
    drafter = GPT(
        GPTConfig(size=None, n_layer=2, n_head=2, dim=64, vocab_size=6, num_classes=3, grid_size=8,
                  registers=RegisterConfig(mode="mutor1d", d_max=3, num_registers=None))
    )  # fmt: skip
    torch.nn.init.normal_(drafter.output.weight, std=0.5)
    save_export(root / "drafter", drafter.state_dict(), drafter.config, tokenizer=record)
    reference = root / "reference"
    rng = np.random.default_rng(0)
    from PIL import Image

    for c in range(3):
        (reference / f"n{c:08d}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(colors[rng.integers(0, 6, (8, 8))]).save(reference / f"n{c:08d}" / f"{i}.png")
    weights = save_random_inception_weights(root / INCEPTION_FILE)

    features: list[np.ndarray] = []
    original = fid_cli.inception_extractor

    def recording_extractor(*args: Any, **kwargs: Any) -> torch.nn.Module:
        extractor = original(*args, **kwargs)
        forward = extractor.forward

        def recorded(x: torch.Tensor):
            result = forward(x)
            features.extend(np.asarray(f.detach().cpu()) for f in result)
            return result

        extractor.forward = recorded
        return extractor

    fid_cli.inception_extractor = recording_extractor
    out: Digests = {}
    try:
        for name, (export, extra) in {
            "per_class_cfg1.5": ("plain", []),
            "random_labels_topk": ("plain", ["--random-labels", "--top-k", "3", "--temperature", "0.8"]),
            "drafted_k3": ("drafter", ["--draft-tokens", "3"]),
        }.items():
            folder = root / "eval" / name
            features.clear()
            argv = [
                "--ckpt", str(root / export), "--num-samples", "12", "--batch-size", "4", "--cfg-scale", "1.5",
                "--ref-folder", str(reference), "--ref-cache", str(root / "cache" / name),
                "--inception-weights", str(weights), "--out", str(folder), "--device", "cpu", "--seed", "2", *extra,
            ]  # fmt: skip
            fid_cli.run(argv)
            pngs = sorted((folder / "samples").glob("*.png"))
            out[f"eval/{name}/pngs"] = digest(*(p.read_bytes() for p in pngs))
            out[f"eval/{name}/png_names"] = digest(" ".join(p.name for p in pngs).encode())
            out[f"eval/{name}/features"] = digest(*features)
            for file in ("samples.npz", "labels.npy", "grid.png"):
                out[f"eval/{name}/{file}"] = digest((folder / file).read_bytes())
            results = json.loads((folder / "results.json").read_text())
            results.pop("sample_and_measure_seconds_this_run")
            out[f"eval/{name}/results.json"] = digest(_paths_out(results, root).encode())
            stamp = json.loads((folder / "sampling_settings.json").read_text())
            out[f"eval/{name}/sampling_settings.json"] = digest(json.dumps(stamp).encode())
            # A rerun over the complete folder samples nothing and reports the same.
            fid_cli.run(argv)
            again = json.loads((folder / "results.json").read_text())
            out[f"eval/{name}/rerun_written"] = str(again["written_this_run"])
            again.pop("sample_and_measure_seconds_this_run")
            again["written_this_run"] = results["written_this_run"]
            out[f"eval/{name}/rerun_results.json"] = digest(_paths_out(again, root).encode())
    finally:
        fid_cli.inception_extractor = original
    return out


def _paths_out(results: dict, root: Path) -> str:
    """results.json as text, the temporary folder's path replaced (it differs between runs)."""
    return json.dumps(results, sort_keys=True).replace(str(root), "ROOT")


# ---------------------------------------------------------------- main


def run_all(parts: list[str]) -> Digests:
    cases: dict[str, Callable[..., Digests]] = {
        "sampling": lambda root: sampling_cases(),
        "compiled": lambda root: compiled_cases(),
        "model": lambda root: model_cases(),
        "training": training_cases,
        "evaluation": evaluation_cases,
    }
    out: Digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            folder = Path(tmp) / part
            folder.mkdir()
            with contextlib.redirect_stdout(sys.stderr):
                out.update(cases[part](folder))
    return out


def compare(before: dict, after: dict) -> dict[str, Any]:
    keys = sorted(set(before["digests"]) | set(after["digests"]))
    rows = {k: {"before": before["digests"].get(k), "after": after["digests"].get(k)} for k in keys}
    for row in rows.values():
        row["equal"] = row["before"] == row["after"]
    return {
        "cases": len(rows),
        "equal": sum(r["equal"] for r in rows.values()),
        "different": [k for k, r in rows.items() if not r["equal"]],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sampling,compiled,model,training,evaluation")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two JSONs of this script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        result = {
            **provenance("equivalence", "cpu"),
            "before": {k: v for k, v in before.items() if k != "digests"},
            "after": {k: v for k, v in after.items() if k != "digests"},
            **compare(before, after),
        }
        print(f"{result['equal']} of {result['cases']} cases equal; different: {result['different'] or 'none'}")
    else:
        torch.use_deterministic_algorithms(True)
        commit = os.popen("git rev-parse HEAD 2>/dev/null").read().strip()
        dirty = bool(os.popen("git status --porcelain --untracked-files=no 2>/dev/null").read().strip())
        result = {
            **provenance("equivalence", "cpu"),
            "commit": commit + ("+changes" if dirty else ""),
            "old_api": OLD_API,
            "digests": run_all(args.parts.split(",")),
        }
        print(f"{len(result['digests'])} digests ({'old' if OLD_API else 'new'} API)")
    save(args.out, result)


if __name__ == "__main__":
    main()
