"""Render bench/results/*.json as Markdown and write it into README.md between the bench markers.

python bench/report.py            # rewrite the README section
python bench/report.py --print    # only print it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def train_step_table(results: list[dict]) -> list[str]:
    lines = [
        "| file | device | config | variant | R | step (s) | images/s | ratio | ideal (N+R)/N | ratio / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results:
        c = result["config"]
        config = c.get("size") or f"{c['n_layer']}L-{c['dim']}d grid{c.get('grid_size', 16)}"
        config += f", batch {c['batch_size']}, {c['dtype']}"
        for row in result["rows"]:
            lines.append(
                f"| {name} | {result['device']} | {config} | {row['variant']} | {row['registers']} | "
                f"{row['step_s']:.4f} | {row['images_per_s']:.1f} | {row['ratio']:.3f} | {row['ideal']:.3f} | "
                f"{row['ratio_over_ideal']:.3f} |"
            )
    return lines


def sample_table(results: list[dict]) -> list[str]:
    lines = [
        "| file | device | model | batch | timed tokens | variant | s | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results:
        c = result["config"]
        for variant, row in result["rows"].items():
            lines.append(
                f"| {name} | {result['device']} | {c.get('size') or 'tiny'} | {c['batch_size']} | "
                f"{result['timed_tokens']} | {variant} | {row['seconds']:.3f} | {row['tokens_per_s']:.1f} |"
            )
    lines.append("")
    lines.append("| file | KV cache speed-up (CFG) | KV cache speed-up (no CFG) | CFG cost | CUDA graph / eager |")
    lines.append("|---|---|---|---|---|")
    for name, result in results:
        r = result["ratios"]
        keys = ("cache_over_nocache_cfg", "cache_over_nocache_nocfg", "cfg_cost", "graph_over_eager_cfg")
        cells = [f"{r[k]:.2f}x" if k in r else "–" for k in keys]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def eval_pipeline_table(results: list[dict]) -> list[str]:
    lines = [
        "| file | device | model | tokenizer | batch | samples | raw sampling img/s | end to end img/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        c, rows = r["config"], r["rows"]
        lines.append(
            f"| {name} | {r['device']} | {c.get('size') or 'small'} | {c['tokenizer']} | {c['batch_size']} | "
            f"{c['num_samples']} | {rows['raw_sampling']['images_per_s']:.2f} | "
            f"{rows['end_to_end']['images_per_s']:.2f} | {r['ratio']:.3f} |"
        )
    return lines


def text_generate_table(results: list[dict]) -> list[str]:
    lines = ["| file | device | prompts | one at a time problems/s | batched problems/s (batch) | ratio |"]
    lines.append("|---|---|---|---|---|---|")
    for name, r in results:
        one, batched = r["rows"]["one_at_a_time"], r["rows"]["batched"]
        lines.append(
            f"| {name} | {r['device']} | {r['config']['prompts']} | {one['problems_per_s']:.1f} | "
            f"{batched['problems_per_s']:.1f} ({batched['batch_size']}) | {r['ratio']:.1f}x |"
        )
    return lines


def speculative_table(results: list[dict]) -> list[str]:
    lines = ["| file | model | batch | temperature | CFG | k | tokens per forward | speed-up (wall) |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, r in results:
        for row in r.get("images", []):
            lines.append(
                f"| {name} | demo MuToR-2D (images) | {row['batch']} | {row['temperature']} | {row['cfg_scale']} | "
                f"{row['draft_tokens']} | {row['tokens_per_forward']:.2f} | {row['speed_up']:.2f}x |"
            )
        for row in r.get("text", []):
            lines.append(
                f"| {name} | tiny Llama, MuToR-1D (text, greedy, = plain output) | {row['batch']} | 0 | – | "
                f"{row['draft_tokens']} | {row['tokens_per_forward']:.2f} | {row['speed_up']:.2f}x |"
            )
    lines += ["", "| file | GPT-B verify step / decode step (batch, k) |", "|---|---|"]
    for name, r in results:
        cells = ", ".join(
            f"{c['verify_over_decode']:.2f} ({c['batch']}, {c['draft_tokens']})" for c in r["verify_cost"]
        )
        lines.append(f"| {name} | {cells} |")
    return lines


def head_loss_table(results: list[dict]) -> list[str]:
    lines = [
        "| file | device | config | head_chunk_size | step (s) | time ratio | peak memory (GiB) | peak ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        c = r["config"]
        config = f"{c['size']}, R={c['registers']}, batch {c['batch_size']}, {c['dtype']}"
        config += ", compiled" if c.get("compile") else ""
        for row in r["rows"]:
            chunk = row["head_chunk_size"] or "0 (whole logits)"
            lines.append(
                f"| {name} | {r['device']} | {config} | {chunk} | {row['step_s']:.3f} | {row['time_ratio']:.3f} | "
                f"{row['peak_bytes'] / 2**30:.2f} | {row['peak_ratio']:.3f} |"
            )
    return lines


def faults_table(results: list[dict]) -> list[str]:
    lines = ["| file | fault | trials | outcomes |", "|---|---|---|---|"]
    for name, r in results:
        for fault, outcomes in r["summary"].items():
            told = "; ".join(f"{count}× {outcome}" for outcome, count in outcomes.items())
            lines.append(f"| {name} | {fault} | {sum(outcomes.values())} | {told} |")
    return lines


def data_table(results: list[dict]) -> list[str]:
    lines = [
        "| file | device | loader samples/s | train-step samples/s (this machine) | ratio | ratio vs an H100 rank "
        "(800 samples/s) | VQ-16 encode img/s | palette encode img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        lines.append(
            f"| {name} | {r['device']} | {r['loader_samples_per_s']:.0f} | {r['train_step_samples_per_s']:.2f} | "
            f"{r['ratio_vs_this_machine_step']:.0f}x | {r['ratio_vs_paper_h100_rank']:.1f}x | "
            f"{r['vq16_256px_images_per_s']:.2f} | {r['palette_256px_images_per_s']:.0f} |"
        )
    return lines


def render() -> str:
    groups: dict[str, list] = {
        "train_step": [],
        "sample": [],
        "data": [],
        "eval_pipeline": [],
        "text_generate": [],
        "speculative": [],
        "head_loss": [],
        "faults": [],
    }
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        groups.setdefault(result["benchmark"], []).append((path.name, result))
    parts = ["Generated by `python bench/report.py` from `bench/results/*.json`.", ""]
    if groups["train_step"]:
        parts += ["**Training step** (`bench/train_step.py`; median of interleaved repeats)", ""]
        parts += [*train_step_table(groups["train_step"]), ""]
    if groups["sample"]:
        parts += ["**Sampling** (`bench/sample.py`)", "", *sample_table(groups["sample"]), ""]
    if groups["eval_pipeline"]:
        parts += ["**Evaluation** (`bench/eval_pipeline.py`)", "", *eval_pipeline_table(groups["eval_pipeline"]), ""]
    if groups["text_generate"]:
        parts += [
            "**Text evaluation** (`bench/text_generate.py`)",
            "",
            *text_generate_table(groups["text_generate"]),
            "",
        ]
    if groups["speculative"]:
        table = speculative_table(groups["speculative"])
        parts += ["**Register drafting** (`bench/speculative.py`; docs/drafting.md)", "", *table, ""]
    if groups["head_loss"]:
        parts += [
            "**Head + loss in chunks** (`bench/head_loss.py`; peak memory: on CUDA the allocator's peak during a "
            "step above its start, on CPU the process's peak RSS)",
            "",
            *head_loss_table(groups["head_loss"]),
            "",
        ]
    if groups["data"]:
        parts += ["**Data** (`bench/data.py`)", "", *data_table(groups["data"]), ""]
    if groups["faults"]:
        parts += ["**Fault injection** (`bench/faults.py`)", "", *faults_table(groups["faults"]), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.print:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
