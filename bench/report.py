"""Render bench/results/*.json as Markdown and write it into docs/benchmarks.md between the bench markers.

python bench/report.py            # rewrite the tables in docs/benchmarks.md
python bench/report.py --print    # only print it
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from mutor_vision.files import write_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGET = ROOT / "docs" / "benchmarks.md"  # the page that holds the tables
Results = list[tuple[str, dict]]  # (file name, its JSON), sorted by file name


def table(header: list[str], rows: Iterable[list]) -> list[str]:
    """A Markdown table: the header, its separator, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def train_step_table(results: Results) -> list[str]:
    header = ["file", "device", "config", "variant", "R", "step (s)", "images/s", "ratio", "ideal (N+R)/N"]
    header.append("ratio / ideal")
    rows = []
    for name, result in results:
        c = result["config"]
        config = c.get("size") or f"{c['n_layer']}L-{c['dim']}d grid{c.get('grid_size', 16)}"
        config += f", batch {c['batch_size']}, {c['dtype']}"
        config += f", {c['chain']} chained" if c.get("chain", 1) > 1 else ""
        for row in result["rows"]:
            rows.append([
                name, result["device"], config, row["variant"], row["registers"], f"{row['step_s']:.4f}",
                f"{row['images_per_s']:.1f}", f"{row['ratio']:.3f}", f"{row['ideal']:.3f}",
                f"{row['ratio_over_ideal']:.3f}",
            ])  # fmt: skip
    return table(header, rows)


def sample_table(results: Results) -> list[str]:
    header = ["file", "device", "model", "batch", "timed tokens", "variant", "s", "tokens/s"]
    rows = [
        [name, result["device"], result["config"].get("size") or "tiny",
         row.get("batch_size", result["config"]["batch_size"]),  # per row since --batch-size 32,64
         result["timed_tokens"], variant, f"{row['seconds']:.3f}", f"{row['tokens_per_s']:.1f}"]
        for name, result in results
        for variant, row in result["rows"].items()
    ]  # fmt: skip
    keys = ("cache_over_nocache_cfg", "cache_over_nocache_nocfg", "cfg_cost", "graph_over_eager_cfg")
    ratios = [
        [name, *(f"{result['ratios'][k]:.2f}x" if k in result["ratios"] else "–" for k in keys)]
        for name, result in results
    ]
    ratio_header = ["file", "KV cache speed-up (CFG)", "KV cache speed-up (no CFG)", "CFG cost", "CUDA graph / eager"]
    return [*table(header, rows), "", *table(ratio_header, ratios)]


def eval_pipeline_table(results: Results) -> list[str]:
    header = ["file", "device", "model", "tokenizer", "batch", "samples", "raw sampling img/s", "end to end img/s"]
    header.append("ratio")
    rows = [
        [name, r["device"], r["config"].get("size") or "small", r["config"]["tokenizer"], r["config"]["batch_size"],
         r["config"]["num_samples"], f"{r['rows']['raw_sampling']['images_per_s']:.2f}",
         f"{r['rows']['end_to_end']['images_per_s']:.2f}", f"{r['ratio']:.3f}"]
        for name, r in results
    ]  # fmt: skip
    return table(header, rows)


def text_generate_table(results: Results) -> list[str]:
    header = ["file", "device", "prompts", "one at a time problems/s", "batched problems/s (batch)", "ratio"]
    rows = []
    for name, r in results:
        one, batched = r["rows"]["one_at_a_time"], r["rows"]["batched"]
        rows.append([
            name, r["device"], r["config"]["prompts"], f"{one['problems_per_s']:.1f}",
            f"{batched['problems_per_s']:.1f} ({batched['batch_size']})", f"{r['ratio']:.1f}x",
        ])  # fmt: skip
    return table(header, rows)


def speculative_table(results: Results) -> list[str]:
    header = ["file", "model", "batch", "temperature", "CFG", "k", "tokens per forward", "speed-up (wall)"]
    rows = []
    for name, r in results:
        for row in r.get("images", []):
            rows.append([
                name, "demo MuToR-2D (images)", row["batch"], row["temperature"], row["cfg_scale"],
                row["draft_tokens"], f"{row['tokens_per_forward']:.2f}", f"{row['speed_up']:.2f}x",
            ])  # fmt: skip
        for row in r.get("text", []):
            rows.append([
                name, "tiny Llama, MuToR-1D (text, greedy, = plain output)", row["batch"], 0, "–",
                row["draft_tokens"], f"{row['tokens_per_forward']:.2f}", f"{row['speed_up']:.2f}x",
            ])  # fmt: skip
    costs = [
        [
            name,
            ", ".join(f"{c['verify_over_decode']:.2f} ({c['batch']}, {c['draft_tokens']})" for c in r["verify_cost"]),
        ]
        for name, r in results
    ]
    return [*table(header, rows), "", *table(["file", "GPT-B verify step / decode step (batch, k)"], costs)]


def head_loss_table(results: Results) -> list[str]:
    header = ["file", "device", "config", "head_chunk_size", "step (s)", "time ratio", "peak memory (GiB)"]
    header.append("peak ratio")
    rows = []
    for name, r in results:
        c = r["config"]
        config = f"{c['size']}, R={c['registers']}, batch {c['batch_size']}, {c['dtype']}"
        config += ", compiled" if c.get("compile") else ""
        for row in r["rows"]:
            rows.append([
                name, r["device"], config, row["head_chunk_size"] or "0 (whole logits)", f"{row['step_s']:.3f}",
                f"{row['time_ratio']:.3f}", f"{row['peak_bytes'] / 2**30:.2f}", f"{row['peak_ratio']:.3f}",
            ])  # fmt: skip
    return table(header, rows)


def faults_table(results: Results) -> list[str]:
    rows = [
        [name, fault, sum(outcomes.values()), "; ".join(f"{count}× {outcome}" for outcome, count in outcomes.items())]
        for name, r in results
        for fault, outcomes in r["summary"].items()
    ]
    return table(["file", "fault", "trials", "outcomes"], rows)


def data_table(results: Results) -> list[str]:
    header = ["file", "device", "loader samples/s", "train-step samples/s (this machine)", "ratio"]
    header += ["ratio vs an H100 rank (800 samples/s)", "VQ-16 encode img/s", "palette encode img/s"]
    rows = [
        [name, r["device"], f"{r['loader_samples_per_s']:.0f}", f"{r['train_step_samples_per_s']:.2f}",
         f"{r['ratio_vs_this_machine_step']:.0f}x", f"{r['ratio_vs_paper_h100_rank']:.1f}x",
         f"{r['vq16_256px_images_per_s']:.2f}", f"{r['palette_256px_images_per_s']:.0f}"]
        for name, r in results
    ]  # fmt: skip
    return table(header, rows)


def gpu_check_table(results: Results) -> list[str]:
    header = ["file", "device", "torch", "commit", "measure", "target", "value", "met"]
    rows = []
    for name, r in results:
        run = [name, r["device"], r["torch"], r["commit"][:10]]
        stages = ", ".join(f"{stage} {entry['status']}" for stage, entry in r["stages"].items())
        rows.append([*run, "stages", "", stages, ""])
        for row in r["targets"]:
            if row["value"] is not None:  # the unmeasured ones: their stage's status above says why
                rows.append([*run, row["measure"], row["target"], row["value"], "yes" if row["met"] else "**no**"])
    return table(header, rows)


# (benchmark name in the JSON, the section's title, its table), in the page's order
def demo_sweep_table(results: Results) -> list[str]:
    header = ["run", "data", "batch × steps", "step (s)", "sampling", "EMA", "consistency", "likelihood acc.", "FID"]
    rows = []
    for _, result in results:
        for r in result["rows"]:
            s = r["sampling"]
            likelihood = r.get("likelihood_accuracy")
            rows.append([
                r["name"] + ("" if r["method"] == "ntp" else f" ({r['method']})"),
                f"{r['data_order']}, {r['shifts']} cop{'y' if r['shifts'] == 1 else 'ies'}, {r['colors']} colours",
                f"{r['batch']} × {r['steps']}",
                f"{r['step_s']:.3f}",
                f"{s['cfg_scale']:g} / {s['temperature']:g} / {s['top_k']}",
                "yes" if r["ema"] else "no",
                f"{r['class_consistency']:.3f}",
                "–" if likelihood is None else f"{likelihood:.3f}",
                f"{r['fid']:.0f}",
            ])  # fmt: skip
    return table(header, rows)


def equivalence_table(results: Results) -> list[str]:
    header = ["file", "before", "after", "cases", "equal", "different"]
    rows = [
        [name, r["before"]["commit"][:10], r["after"]["commit"][:10], r["cases"], r["equal"],
         ", ".join(r["different"]) or "none"]
        for name, r in results
    ]  # fmt: skip
    return table(header, rows)


SECTIONS: list[tuple[str, str, Callable[[Results], list[str]]]] = [
    ("gpu_check", "**GPU check** (`make gpu-check`; each stage's rows and status are in the file)", gpu_check_table),
    ("train_step", "**Training step** (`bench/train_step.py`; median of interleaved repeats)", train_step_table),
    ("sample", "**Sampling** (`bench/sample.py`)", sample_table),
    ("eval_pipeline", "**Evaluation** (`bench/eval_pipeline.py`)", eval_pipeline_table),
    ("text_generate", "**Text evaluation** (`bench/text_generate.py`)", text_generate_table),
    ("speculative", "**Register drafting** (`bench/speculative.py`; docs/drafting.md)", speculative_table),
    (
        "head_loss",
        "**Head + loss in chunks** (`bench/head_loss.py`; peak memory: on CUDA the allocator's peak during a "
        "step above its start, on CPU the process's peak RSS)",
        head_loss_table,
    ),
    ("data", "**Data** (`bench/data.py`)", data_table),
    (
        "demo_sweep",
        "**Digits-demo sweep** (`bench/demo_sweep.py`; next-token unless named, one seed per row, CFG / "
        "temperature / top-k of the sampling; likelihood accuracy: how often a held-out image's own label gives "
        "its lowest NLL, chance 0.1)",
        demo_sweep_table,
    ),
    ("faults", "**Fault injection** (`bench/faults.py`)", faults_table),
    (
        "equivalence",
        "**Refactors, bit for bit** (`bench/equivalence.py`: sha256 of sampled codes — eager, no-cache, "
        "compiled through inductor, drafted —, model logits, losses and gradients, trained weights, and "
        "eval/fid.py's PNGs, features, npz and results.json, on tiny CPU models, before and after)",
        equivalence_table,
    ),
]


def render() -> str:
    groups: dict[str, Results] = {}
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        groups.setdefault(result["benchmark"], []).append((path.name, result))
    parts = ["Generated by `python bench/report.py` from `bench/results/*.json`.", ""]
    for benchmark, title, render_table in SECTIONS:
        if groups.get(benchmark):
            parts += [title, "", *render_table(groups[benchmark]), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.print:
        print(text)
        return
    write_section(TARGET, "bench", text)


if __name__ == "__main__":
    main()
