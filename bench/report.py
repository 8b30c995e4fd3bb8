"""Render bench/results/*.json as Markdown: the tables of docs/benchmarks.md, README's status and
docs/evaluation.md's protocol table, each written between its markers (tests/test_docs.py checks
that none has drifted from what this writes).

python bench/report.py            # rewrite every generated section
python bench/report.py --print    # only print them
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # demo/ (the demos' README sections)

from demo.report import readme_section  # noqa: E402
from mutor_vision.files import write_section  # noqa: E402

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
    """One row per fault; a lost machine's rows add the slowest survivor's seconds from the kill to its exit."""
    rows = [
        [name, fault, sum(outcomes.values()), "; ".join(f"{count}× {outcome}" for outcome, count in outcomes.items()),
         r.get("slowest_stop_s", {}).get(fault, "–")]
        for name, r in results
        for fault, outcomes in r["summary"].items()
    ]  # fmt: skip
    return table(["file", "fault", "trials", "outcomes", "slowest survivor stop (s)"], rows)


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


def demo_variation_table(results: Results) -> list[str]:
    header = ["file", "variant", "threads", "same weights as base", "class consistency", "FID", "likelihood acc."]
    rows = [
        [name, variant, row["threads"], "yes" if row["identical_weights"] else "no",
         f"{row['class_consistency']:.3f}", f"{row['fid']:.1f}", f"{row['likelihood_accuracy']:.3f}"]
        for name, r in results
        for variant, row in r["rows"].items()
    ]  # fmt: skip
    return table(header, rows)


def struck_table(results: Results) -> list[str]:
    rows = [[r["file"], r["where"], r["values"], r["reason"]] for _, result in results for r in result["rows"]]
    return table(["file", "where", "values", "why they do not count"], rows)


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
        "demo_variation",
        "**The digits demo across machines** (`bench/demo_variation.py`: one demo run, retrained under each source "
        "of variation this machine can imitate)",
        demo_variation_table,
    ),
    ("struck", "**Struck figures** (`bench/results/struck.json`: kept in their files, not to be quoted)", struck_table),
    (
        "equivalence",
        "**Refactors, bit for bit** (`bench/equivalence.py`: sha256 of sampled codes — eager, no-cache, "
        "compiled through inductor, drafted —, model logits, losses and gradients, trained weights, and "
        "eval/fid.py's PNGs, features, npz and results.json, on tiny CPU models, before and after)",
        equivalence_table,
    ),
]


def load_results() -> dict[str, Results]:
    """Every committed result, grouped by its benchmark name (files in name order)."""
    groups: dict[str, Results] = {}
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        groups.setdefault(result["benchmark"], []).append((path.name, result))
    return groups


def render(groups: dict[str, Results] | None = None) -> str:
    """docs/benchmarks.md's tables."""
    groups = load_results() if groups is None else groups
    parts = ["Generated by `python bench/report.py` from `bench/results/*.json`.", ""]
    for benchmark, title, render_table in SECTIONS:
        if groups.get(benchmark):
            parts += [title, "", *render_table(groups[benchmark]), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- README's status


def render_status(groups: dict[str, Results]) -> str:
    """README's status, short: how many GPU targets are met (each measure at its newest run), the main
    figures, and the comparison with LlamaGen's own code, each naming the file it comes from."""
    newest: dict[str, tuple[str, dict, dict]] = {}
    for name, result in groups.get("gpu_check", []):  # name order is run order: later files win
        for row in result["targets"]:
            if row["value"] is not None:
                newest[row["measure"]] = (name, result, row)

    def figure(measure: str) -> str:
        return str(newest[measure][2]["value"]) if measure in newest else "not measured"

    def files(*measures: str) -> str:
        return ", ".join(f"`{n}`" for n in dict.fromkeys(newest[m][0] for m in measures if m in newest))

    step = ("MuToR-2D R=80 / NTP step per ideal, eager", "MuToR-2D R=80 / NTP step per ideal, compiled")
    speed = ("compiled images/s, ntp, batch 128", "compiled images/s, mutor2d:80+flex, batch 128")
    evaluation = "eval/fid.py end to end / raw sampling"
    lines = ["Generated by `python bench/report.py` from `bench/results/`.", ""]
    if newest:
        met = sum(1 for _, _, row in newest.values() if row["met"])
        devices = sorted({f"{r['device']}, torch {r['torch']}" for _, r, _ in newest.values()})
        lines.append(f"- GPU targets met: **{met} of {len(newest)}**, each at its newest run on {'; '.join(devices)} "
                     "(every one in docs/benchmarks.md)")  # fmt: skip
        lines.append(
            f"- the MuToR-2D (R = 80) step over next-token's, per the ideal (N+R)/N: {figure(step[0])} eager, "
            f"{figure(step[1])} compiled; compiled images/s at batch 128: {figure(speed[0])} next-token, "
            f"{figure(speed[1])} MuToR-2D ({files(*step, *speed)})"
        )
        lines.append(f"- `eval/fid.py` end to end over raw sampling: {figure(evaluation)} ({files(evaluation)})")
    for name, result in groups.get("vs_llamagen", []):
        for key, row in (result.get("sampling") or {}).items():
            lines.append(
                f"- compiled sampling at {key.replace('_', ' ')}: {row['ours_compiled_over_llamagen_compiled']:.2f}× "
                f"LlamaGen's compiled `generate`, the same GPU and process (`{name}`)"
            )
        if result.get("training"):
            ratio = result["training"]["ours_ntp_over_llamagen_ntp_time"]
            lines.append(
                f"- a next-token training step: {ratio:.2f}× LlamaGen's time, the same GPU and process (`{name}`)"
            )
        if result.get("equality"):
            equality = result["equality"]
            codes = "equal" if equality["greedy_cfg_codes_equal"] else "not equal"
            lines.append(
                f"- the same weights as LlamaGen's own model, fp32 on {equality['device']}: logits within "
                f"{equality['logits_max_abs_diff']:.1e} (largest logit {equality['logits_max_abs']:.2f} in size), "
                f"greedy CFG codes {codes} (`{name}`)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- docs/evaluation.md's protocol table


def render_protocol(groups: dict[str, Results]) -> str:
    """This protocol beside LlamaGen's ``sample_c2i_ddp.py`` and ADM's ``evaluator.py``, a row per aspect,
    each difference with its measured size where one could be measured (``bench/protocol.py``)."""
    name, p = groups.get("protocol", [(None, {})])[-1]
    equality_name, equality = next(
        ((n, r["equality"]) for n, r in groups.get("vs_llamagen", []) if r.get("equality")), (None, None)
    )
    missing = "not measured yet (`python bench/protocol.py`)"
    label_size, is_size, pr_size, codes = missing, missing, missing, missing
    if p.get("labels"):
        fid, consistency = p["labels"]["summary"]["fid"], p["labels"]["summary"]["class_consistency"]
        label_size = (
            f"per-class minus random labels on the digits demo ({p['labels']['samples']} samples): FID "
            f"{fid['per_class_minus_random']:+.2f}, class consistency {consistency['per_class_minus_random']:+.3f}; "
            f"two random-label seeds: FID {fid['seed_to_seed_random']:+.2f}, consistency "
            f"{consistency['seed_to_seed_random']:+.3f} (`{name}`)"
        )
    if p.get("is_splits"):
        splits = p["is_splits"]
        is_size = (
            f"same: ADM's rule (ours / ADM's - 1 = {splits['10000']['ours_relative_difference']:.1g}); "
            "torch-fidelity's 10 splits, used before, equal it at 50,000 and differ by "
            f"{splits['10000']['ten_splits_relative_difference']:+.2%} at 10,000 on synthetic logits (`{name}`)"
        )
    if p.get("pr_float16"):
        pr = p["pr_float16"]
        pr_size = (
            f"float64 minus ADM's float16 distances, {pr['features']:,} synthetic Inception-like features a side: "
            f"precision {pr['difference']['precision']:+.4f}, recall {pr['difference']['recall']:+.4f} (`{name}`)"
        )
    if equality:
        same = "equal" if equality["greedy_cfg_codes_equal"] else "differ"
        codes = (
            f"the same weights, fp32 on {equality['device']}: logits max abs Δ {equality['logits_max_abs_diff']:.1e}, "
            f"greedy CFG codes {same} (`{equality_name}`)"
        )
    rows = [
        ("labels", "uniform at random: `torch.randint` on each rank, seeded by global seed × world + rank",
         "uniform at random (the default): one list from `--seed`, the same for any number of ranks; "
         "`--per-class` for i % classes", "same distribution, other draws; " + label_size),
        ("random numbers", "`torch.multinomial` on each rank's generator", "the inverse CDF at per-image uniform "
         "numbers from (seed, image index), so a rerun refills exactly",
         "same distribution (an exact draw), other draws"),
        ("sample count", "rounded up to whole global batches; the npz holds indices 0..49,999", "exactly "
         "`--num-samples`", "same"),
        ("CFG", "on logits, conditional rows first, null-class rows second, when the scale is > 1; "
         "`cfg_interval`", "the same, when the scale is ≠ 1; `--cfg-interval`", "same at every scale > 1"),
        ("sampling settings", "its script's defaults: CFG 1.5, temperature 1, top-k 0, top-p 1",
         "the paper's: CFG 2.0, temperature 1, top-k 0, top-p 1", "pass `--cfg-scale` to match a LlamaGen run"),
        ("model and precision", "bf16 weights, TF32 matmuls, compiled by default", "bf16 weights on CUDA (RoPE table "
         "fp32), `--compile` optional", codes),
        ("VQ-16 decode", "fp32 weights, cuDNN's TF32 allowed", "fp32, TF32 as PyTorch's default (recorded in "
         "results.json); `--decode-precision bf16` is not the protocol", "same"),
        ("pixels", "clamp(127.5·x + 128, 0, 255), cast to uint8", "the same (`tokenizer/preprocess.py`)", "same"),
        ("sample batch", "`arr_0`, uint8 (N, H, W, 3), read back from the PNGs", "the same, streamed", "same"),
        ("reference", "`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma` of ImageNet train, `arr_0` 10,000 images",
         "the same file: its `mu`, `sigma`; features of its `arr_0` for precision/recall", "same"),
        ("Inception", "the TF graph: pool3 (2048) and its logits", "torch-fidelity's `inception-v3-compat`, a port "
         "of the same graph", "not measured here (TensorFlow is not installed)"),
        ("FID", "‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), scipy's sqrtm", "torch-fidelity's, the same formula in float64",
         "same (`tests/test_eval.py`)"),
        ("IS", "softmax of the logits, exp of the mean KL per chunk of 5,000 images, in order",
         "the same rule (`mutor_vision/evaluation/metrics.py`)", is_size),
        ("precision, recall", "k = 3 manifolds of samples and the 10,000 reference images; squared distances in "
         "float16 (float32 when not finite)", "the same definition, distances in float64", pr_size),
    ]  # fmt: skip
    lines = [
        "Generated by `python bench/report.py` from `bench/results/`.",
        "",
        "| aspect | LlamaGen `sample_c2i_ddp.py` + ADM `evaluator.py` | here (`eval/fid.py`) | same? |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def generated_sections(groups: dict[str, Results] | None = None) -> list[tuple[Path, str, str]]:
    """(file, section, body) of every section this script writes: what a test checks has not drifted."""
    groups = load_results() if groups is None else groups
    sections = [
        (TARGET, "bench", render(groups)),
        (ROOT / "README.md", "status", render_status(groups)),
        (ROOT / "docs" / "evaluation.md", "protocol", render_protocol(groups)),
    ]
    for benchmark, section in (("demo_digits", "demo"), ("demo_text", "demo-text")):  # written by --publish
        for _, record in groups.get(benchmark, [])[-1:]:
            sections.append((ROOT / "README.md", section, readme_section(record)))
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the sections instead of writing them")
    args = parser.parse_args()
    for path, name, body in generated_sections():
        if args.print:
            print(f"<!-- {path.relative_to(ROOT)}: {name} -->\n{body}\n")
        else:
            write_section(path, name, body)


if __name__ == "__main__":
    main()
