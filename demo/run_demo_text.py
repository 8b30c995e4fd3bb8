"""The text demo: MuToR-1D against next-token fine-tuning of a causal LM, offline, in minutes.

    make demo-text                   # = python demo/run_demo_text.py --out runs/demo-text   (3 seeds, ~4 min, CPU)
    python demo/run_demo_text.py --smoke --out /tmp/demo-text    # a few steps of everything (the test suite)
    python demo/run_demo_text.py --publish    # also: its table into README.md, its figure into docs/figures/

A synthetic reasoning task — multi-step arithmetic word problems drawn with a seed, answered step
by step and ending in GSM8K's ``#### N`` — split into train and held-out problems; a word tokenizer
built from the data; a small Llama created locally (random initialisation, one per seed, shared by
both methods). Each method trains with ``train_sft.py``'s trainer and its shipped recipe
(``configs/text/gsm8k_{ntp,mutor}.yaml``: AdamW, warm-up, bidirectional prompt, per-sample loss
means, d_max 4, a = 0.3), with only what a model trained from scratch needs scaled: size, steps,
batch and learning rate. Every checkpoint is evaluated on the held-out problems by
``eval/gsm8k.py`` (greedy, the MuToR authors' scoring) and by the held-out answer NLL; the MuToR
models also draft with their registers (tokens per forward). Output: ``report.md``, ``report.json``
and ``convergence.png`` under ``--out``. Nothing is downloaded.

Rerunning resumes what is there: a finished run is evaluated again, an interrupted one continues
from its checkpoint, and a run whose config was edited is trained anew.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.report import compare, comparison_table, convergence_panels, machine_record, publish, readme_section  # noqa: E402
from demo.runs import discard_if_edited  # noqa: E402
from mutor_vision.cli import HelpFormatter, setup_logging  # noqa: E402
from mutor_vision.config import load_yaml  # noqa: E402
from mutor_vision.files import atomic_write_json, atomic_write_text  # noqa: E402
from mutor_vision.text.config import GSM8K_ANSWER, GSM8K_PROMPT, TextTrainConfig  # noqa: E402
from mutor_vision.text.data import build_examples, collate, word_tokenizer  # noqa: E402
from mutor_vision.text.tiny import tiny_causal_lm  # noqa: E402
from mutor_vision.text.train import train_text  # noqa: E402
from mutor_vision.training.checkpoints import CheckpointManager, checkpoint_step  # noqa: E402

log = logging.getLogger("demo-text")
METHODS = {"ntp": "Next-token", "mutor": "MuToR-1D"}
METRICS = [  # (key, title, lower is better)
    ("accuracy", "Held-out accuracy (authors' scoring)", False),
    ("heldout_nll", "Held-out answer NLL (nats/token)", True),
]
# (question, worked answer); a, b, c in 1..9, x and y the intermediate and final results.
PROBLEMS = (
    ("Ann has {a} coins . She finds {b} more and then spends {c} . How many coins does she have now ?",
     "{a} + {b} = {x} . {x} - {c} = {y} . #### {y}", lambda a, b, c: (a + b, a + b - c)),
    ("Tim buys {a} bags with {b} apples in each bag and eats {c} apples . How many apples are left ?",
     "{a} * {b} = {x} . {x} - {c} = {y} . #### {y}", lambda a, b, c: (a * b, a * b - c)),
    ("Mia has {a} pens . She gets {b} more pens and then {c} more . How many pens does she have ?",
     "{a} + {b} = {x} . {x} + {c} = {y} . #### {y}", lambda a, b, c: (a + b, a + b + c)),
    ("Leo has {a} cards and gets {b} more . Then he doubles his cards . How many cards does he have ?",
     "{a} + {b} = {x} . {x} * 2 = {y} . #### {y}", lambda a, b, c: (a + b, 2 * (a + b))),
    ("A farm has {a} rows of {b} trees . {c} trees fall . How many trees stand ?",
     "{a} * {b} = {x} . {x} - {c} = {y} . #### {y}", lambda a, b, c: (a * b, a * b - c)),
    ("Eva reads {a} pages on Monday and {b} on Tuesday , then {c} times as many on Wednesday as on Tuesday . "
     "How many pages does she read ?", "{b} * {c} = {x} . {a} + {b} + {x} = {y} . #### {y}",
     lambda a, b, c: (b * c, a + b + b * c)),
)  # fmt: skip
SPACE = 9**3  # (a, b, c) per template


@dataclass(frozen=True)
class Plan:
    """What one demo invocation does."""

    seeds: tuple[int, ...]
    train_rows: int
    test_rows: int
    epochs: int
    batch: int
    lr: float
    hidden_size: int
    layers: int
    evaluations: int  # checkpoints evaluated per run, evenly spaced (the last is the final step)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        if args.smoke:
            return cls((0, 1), 48, 12, 2, 8, 3e-3, 32, 1, 2)
        return cls(tuple(range(args.seeds)), 2400, 300, 12, 32, 3e-3, 128, 2, 4)


# ---------------------------------------------------------------- data and models


def reasoning_records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``count`` distinct problems (question, answer ending in ``#### y``), no question from ``exclude``."""
    rng = random.Random(seed)
    records, seen = [], set(exclude)
    if count + len(exclude) > 0.8 * SPACE * len(PROBLEMS):  # the draw below would crawl, then never end
        raise ValueError(f"{count} problems: the task holds about {SPACE * len(PROBLEMS):,} distinct ones")
    while len(records) < count:
        question, worked, solve = PROBLEMS[rng.randrange(len(PROBLEMS))]
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        x, y = solve(a, b, c)
        text = question.format(a=a, b=b, c=c)
        if y < 0 or text in seen:
            continue
        seen.add(text)
        records.append({"question": text, "answer": worked.format(a=a, b=b, c=c, x=x, y=y)})
    return records


def prepare(out: Path, plan: Plan) -> tuple[dict[str, Path], int]:
    """Train/test JSONL, and per seed a freshly initialised model directory with the shared tokenizer;
    the paths and the model's parameter count."""
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)  # deterministic and cheap: never mix two versions
    data.mkdir(parents=True)
    train = reasoning_records(plan.train_rows, seed=0)
    test = reasoning_records(plan.test_rows, seed=1, exclude={r["question"] for r in train})
    texts = [GSM8K_PROMPT.format(prompt=r["question"]) + GSM8K_ANSWER.format(answer=r["answer"]) for r in train + test]
    numbers = " ".join(str(n) for n in range(200))  # every result the task can produce is a known word
    tokenizer = word_tokenizer([*texts, numbers], split_punctuation=False)
    paths = {"train": data / "train.jsonl", "test": data / "test.jsonl"}
    for name, rows in (("train", train), ("test", test)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in plan.seeds:
        model = tiny_causal_lm(len(tokenizer), seed=seed, hidden_size=plan.hidden_size, num_layers=plan.layers)
        paths[f"model{seed}"] = data / f"model-seed{seed}"
        model.save_pretrained(paths[f"model{seed}"])
        tokenizer.save_pretrained(paths[f"model{seed}"])
    return paths, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training


def run_config(method: str, seed: int, paths: dict[str, Path], out: Path, plan: Plan) -> TextTrainConfig:
    """The shipped recipe of ``method``, with the size-dependent keys scaled and the demo's paths."""
    steps = plan.epochs * (plan.train_rows // plan.batch)
    overrides = [
        f"model.name_or_path={paths[f'model{seed}']}", "model.dtype=float32", f"data.jsonl={paths['train']}",
        "data.hf_name=null", "data.max_length=96", f"epochs={plan.epochs}", f"global_batch_size={plan.batch}",
        f"micro_batch_size={plan.batch}", f"optim.lr={plan.lr}", "mixed_precision=no", "device=cpu",
        f"out_dir={out / f'{method}-seed{seed}'}", f"seed={seed}", f"save_every={max(1, steps // plan.evaluations)}",
        "keep_last=100", "log_every=10", "tensorboard=true",
    ]  # fmt: skip
    return load_yaml(TextTrainConfig, ROOT / "configs" / "text" / f"gsm8k_{method}.yaml", overrides)


def train_run(method: str, seed: int, paths: dict[str, Path], out: Path, plan: Plan) -> Path:
    """Train (or resume, or keep) one run; a run whose recorded config differs is trained anew."""
    config = run_config(method, seed, paths, out, plan)
    run = Path(config.out_dir)
    discard_if_edited(run, config, TextTrainConfig)
    result = train_text(config, resume="auto")
    if result.reason != "completed":
        raise SystemExit(f"demo-text: {run.name} stopped at step {result.step}; run the same command again to continue")
    return run


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nll(export: Path, test: Path) -> float:
    """Mean next-token NLL of the held-out answers (nats per answer token), prompts attended as in training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mutor_vision.core.config import TextRegisterConfig
    from mutor_vision.text.adapter import MuToRAdapter

    model = AutoModelForCausalLM.from_pretrained(export / "model", attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(export / "model")
    records = [json.loads(line) for line in test.read_text().splitlines()]
    examples, _ = build_examples(records, tokenizer, "question", "answer", GSM8K_PROMPT, GSM8K_ANSWER, 96)
    batch = collate(examples, tokenizer.pad_token_id)
    adapter = MuToRAdapter(model, TextRegisterConfig(mode="ntp", loss_normalization="token"))
    return adapter.loss(batch["input_ids"], batch["prompt_len"], batch["answer_len"], adapter(**batch)).ntp.item()


def answer(export: Path, test: Path, out: Path, draft_tokens: int = 1) -> dict:
    """``eval/gsm8k.py`` on the held-out problems (greedy, authors' scoring)."""
    from eval import gsm8k  # the repo root is on sys.path (above)

    argv = ["--ckpt", str(export), "--data", str(test), "--max-new-tokens", "32", "--batch-size", "64"]
    return gsm8k.run([*argv, "--device", "cpu", "--draft-tokens", str(draft_tokens), "--out", str(out)])


def evaluate_run(run: Path, test: Path) -> list[dict]:
    """Accuracy and held-out NLL at every checkpoint of a run."""
    rows = []
    for checkpoint in CheckpointManager(run / "checkpoints", 1).complete():
        step, export = checkpoint_step(checkpoint), checkpoint / "export"
        results = answer(export, test, run / "eval" / f"step_{step:08d}.json")
        rows.append({"step": step, "accuracy": results["accuracy"], "heldout_nll": heldout_nll(export, test)})
    return rows


def drafting(run: Path, test: Path) -> list[dict]:
    """Register drafting on the final MuToR export: tokens per forward, answers equal to plain greedy."""
    export = CheckpointManager(run / "checkpoints", 1).complete()[-1] / "export"
    plain = answer(export, test, run / "eval" / "draft_1.json")["samples"]
    rows = []
    for k in (2, 3, 4):
        results = answer(export, test, run / "eval" / f"draft_{k}.json", draft_tokens=k)
        same = [a["prediction"] for a in results["samples"]] == [a["prediction"] for a in plain]
        rows.append({"draft_tokens": k, "tokens_per_forward": results["tokens_per_forward"], "equal_to_plain": same})
    return rows


def step_seconds(run: Path) -> float:
    """The median step time from the run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for path in sorted((run / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if "perf/step_s" in events.Tags()["scalars"]:
            times += [e.value for e in events.Scalars("perf/step_s")]
    return float(np.median(times)) if times else float("nan")


# ---------------------------------------------------------------- report


def plot_convergence(evaluations: dict[str, dict[int, list[dict]]], path: Path) -> None:
    title = "Multi-step arithmetic, held-out problems (band: min to max over seeds)"
    convergence_panels(evaluations, METRICS, METHODS, title, path)


def write_report(out: Path, report: dict, plan: Plan) -> None:
    summary, compute = report["summary"], report["compute"]
    lines = [
        "# mutor-vision text demo: MuToR-1D vs next-token on multi-step arithmetic",
        "",
        f"{len(plan.seeds)} seeds per method (the same initial model per seed for both), {plan.train_rows:,} "
        f"training problems, {plan.test_rows} held-out ones, {compute['ntp']['steps']} steps of batch "
        f"{plan.batch}, a {plan.layers}-layer Llama of width {plan.hidden_size} "
        f"({report['parameters']:,} parameters) on {torch.get_num_threads()} CPU threads; this invocation took "
        f"{report['seconds'] / 60:.1f} min (runs trained earlier are reused). Mean ± standard deviation over "
        "seeds at the last step; the verdict is a Welch t-test (p < 0.05) of MuToR-1D against next-token.",
        "",
    ]
    lines += comparison_table(summary, METRICS, METHODS)
    lines += [
        "",
        "## Compute, measured alike",
        "",
        "| | Next-token | MuToR-1D |",
        "|---|---|---|",
        f"| optimizer steps | {compute['ntp']['steps']} | {compute['mutor']['steps']} |",
        f"| median step time (s), from the training logs | {compute['ntp']['step_s']:.4f} | "
        f"{compute['mutor']['step_s']:.4f} |",
        "",
        "## Register drafting (MuToR-1D, greedy, final checkpoints)",
        "",
        "| draft tokens k | tokens per forward (mean over seeds) | answers equal to plain greedy |",
        "|---|---|---|",
    ]
    for k, rows in report["drafting"].items():
        mean = np.mean([r["tokens_per_forward"] for r in rows])
        lines.append(f"| {k} | {mean:.2f} | {'yes' if all(r['equal_to_plain'] for r in rows) else 'NO'} |")
    lines += [
        "",
        "## What this measures, and what it cannot say",
        "",
        "- The method is the paper's text recipe (registers before answer tokens, d uniform in 1..4, a = 0.3, "
        "a bidirectional prompt, per-sample loss means, AdamW with linear warm-up and decay), through the same "
        "trainer, export and evaluation code as GSM8K. Only what a model trained from scratch needs is scaled: "
        "the model (a small random Llama instead of a pretrained Gemma), the steps, the batch and the learning "
        "rate.",
        "- It is not GSM8K: synthetic two-step problems over small numbers, a word tokenizer, minutes of CPU "
        "training. With a handful of seeds, only differences larger than the seed-to-seed spread mean "
        "anything; the verdict column says which.",
        "",
        "![convergence](convergence.png)",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


# ---------------------------------------------------------------- main


FIGURE = ROOT / "docs" / "figures" / "demo_text_convergence.png"


RECORD = ROOT / "bench" / "results" / "demo_text_cpu.json"


def publish_report(out: Path, report: dict) -> None:
    """The run's record into bench/results/demo_text_cpu.json (its numbers, the machine and the libraries'
    versions), the README section written from it, and the figure into docs/figures/."""
    seeds, steps = len(report["plan"]["seeds"]), report["compute"]["ntp"]["steps"]
    k4 = float(np.mean([r["tokens_per_forward"] for r in report["drafting"][4]]))
    record = {
        "benchmark": "demo_text",
        "file": RECORD.name,
        "command": "make demo-text",
        "publish_command": "python demo/run_demo_text.py --publish",
        "setting_line": f"{seeds} seeds × {steps} steps each",
        "minutes": report["seconds"] / 60,  # this invocation's; it depends on the machine and its load
        "metrics": METRICS,
        "methods": METHODS,
        "summary": report["summary"],
        "extra_lines": [
            f"MuToR-1D's registers draft greedy answers at {k4:.2f} tokens per forward (k = 4), the answers "
            "unchanged. ![text demo convergence](docs/figures/demo_text_convergence.png)"
        ],
        "machine_record": machine_record(),
        "plan": report["plan"],
        "compute": report["compute"],
        "drafting_k4_tokens_per_forward": k4,
    }
    atomic_write_json(RECORD, record)
    publish(ROOT / "README.md", "demo-text", readme_section(record), {out / "convergence.png": FIGURE})


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demo/run_demo_text.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-text", help="the demo's folder (resumed)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--publish", action="store_true", help="write the table into README.md, the figure to docs/")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.publish and args.smoke:
        parser.error("--publish reports the full setting, not --smoke")
    setup_logging()
    start = time.perf_counter()
    plan, out = Plan.of(args), args.out
    out.mkdir(parents=True, exist_ok=True)
    paths, parameters = prepare(out, plan)
    evaluations: dict[str, dict[int, list[dict]]] = {m: {} for m in METHODS}
    runs: dict[str, dict[int, Path]] = {m: {} for m in METHODS}
    for seed in plan.seeds:
        for method in METHODS:
            runs[method][seed] = train_run(method, seed, paths, out, plan)
            evaluations[method][seed] = evaluate_run(runs[method][seed], paths["test"])
    final = {m: [rows[-1] for rows in evaluations[m].values()] for m in METHODS}
    summary = {}
    for key, _, lower in METRICS:
        entry = compare([r[key] for r in final["mutor"]], [r[key] for r in final["ntp"]], lower, METHODS["mutor"])
        summary[key] = {"ntp": entry.pop("baseline"), "mutor": entry.pop("treated"), **entry}
    draft_rows = [drafting(run, paths["test"]) for run in runs["mutor"].values()]
    report = {
        "plan": plan.__dict__,
        "summary": summary,
        "evaluations": evaluations,
        "drafting": {row["draft_tokens"]: [rows[i] for rows in draft_rows] for i, row in enumerate(draft_rows[0])},
        "compute": {
            m: {
                "steps": evaluations[m][plan.seeds[0]][-1]["step"],
                "step_s": float(np.median([step_seconds(r) for r in runs[m].values()])),
            }
            for m in METHODS
        },
        "parameters": parameters,
        "seconds": time.perf_counter() - start,
    }
    plot_convergence(evaluations, out / "convergence.png")
    write_report(out, report, plan)
    atomic_write_json(out / "report.json", report)
    if args.publish:
        publish_report(out, report)
    log.info("demo-text done in %.1f min: %s", report["seconds"] / 60, out / "report.md")
    return report


if __name__ == "__main__":
    main()
