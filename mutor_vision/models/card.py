"""The model card of an export (``README.md``): what the model is, how it was trained, how it scored,
and how to load it — written from the export's own records, so it never says more than they hold."""

from __future__ import annotations

from typing import Any

from mutor_vision.models.config import GPTConfig

# LlamaGen's names for its VQ-16 decoder and sampling script (its repository's README).
LLAMAGEN_SAMPLE = (
    "python3 autoregressive/sample/sample_c2i.py --vq-ckpt vq_ds16_c2i.pt --gpt-model {size} "
    "--gpt-ckpt {weights} --image-size {image_size}"
)


def model_card(
    title: str,
    config: GPTConfig,
    tokenizer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    evaluations: list[dict[str, Any]] | None = None,
    llamagen_file: str | None = None,
    location: str = "path/to/this/folder",
) -> str:
    """Markdown for ``README.md``. ``tokenizer``, ``data``, ``training``: the export's records;
    ``evaluations``: ``results.json`` files of ``eval/fid.py``; ``llamagen_file``: the name of the
    LlamaGen-form weights beside it, when written; ``location``: where readers load it from (a folder
    or a Hugging Face Hub id)."""
    registers = config.registers
    count = f"{registers.num_registers} registers" if registers.num_registers is not None else "a register per slot"
    if not registers.enabled:
        trained_with = "none: plain next-token training (LlamaGen's)"
    elif registers.mode == "mutor2d":
        trained_with = (
            f"MuToR-2D: {count}, targets up to {registers.d_max_2d - 1} rows and columns ahead, "
            f"loss weight {registers.weight}"
        )
    else:
        trained_with = f"MuToR-1D: {count}, offsets 1..{registers.d_max}, loss weight {registers.weight}"
    shape = f"{config.n_layer} layers, {config.n_head} heads, dim {config.dim}"
    held = (data or {}).get("num_classes")
    classes = f"{config.num_classes}" + (
        f" (the training data held {held})" if held and held != config.num_classes else ""
    )
    rows = [
        ("architecture", f"LlamaGen class-conditional GPT ({config.size + ': ' if config.size else ''}{shape})"),
        ("tokens", f"{config.grid_size} × {config.grid_size} grid, codebook {config.vocab_size}"),
        ("classes", classes),
        ("registers in training", trained_with),
        ("registers at inference", "none: sampling is plain LlamaGen sampling, at its cost"),
    ]
    if tokenizer:
        described = f"{tokenizer.get('kind')} `{tokenizer.get('path')}` (sha256 {tokenizer.get('checksum')})"
        rows.append(("tokenizer", described))
    if training:
        step, steps = training.get("step"), training.get("steps")
        rows.append(("training", f"step {step:,} of {steps:,}" if step is not None and steps else "unknown"))
        for key, label in (("data_root", "data"), ("global_batch_size", "global batch"), ("lr", "learning rate"),
                           ("seed", "seed"), ("mixed_precision", "precision")):  # fmt: skip
            if training.get(key) is not None:
                value = "fp32" if key == "mixed_precision" and training[key] == "no" else training[key]
                rows.append((label, str(value)))
    lines = [f"# {title}", "", "A class-conditional image model trained with mutor-vision.", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += _evaluation_table(evaluations or [])
    examples = "207,360,387" if config.num_classes == 1000 else ",".join(map(str, range(min(3, config.num_classes))))
    lines += [
        "## Load it",
        "",
        "```python",
        "from mutor_vision.models import GPT, SamplingConfig, generate",
        f'model = GPT.from_pretrained("{location}")  # a folder or a Hugging Face Hub id',
        "codes = generate(model, labels, SamplingConfig(cfg_scale=2.0))  # (B, h, w) token grids",
        "```",
        "",
        f"`python sample_c2i.py --ckpt {location} --classes {examples}` draws a grid of chosen classes; "
        f"`python eval/fid.py --ckpt {location} ...` evaluates it.",
        "",
    ]
    if llamagen_file:
        lines.append(
            f"`{llamagen_file}` holds the same weights as LlamaGen's own scripts load them (a `model` entry, "
            "LlamaGen's keys, no register vector)."
        )
        if config.size and (tokenizer or {}).get("kind", "vq16") == "vq16":
            weights, image_size = f"{location}/{llamagen_file}", config.grid_size * 16  # VQ-16 downsamples 16x
            command = LLAMAGEN_SAMPLE.format(size=config.size, weights=weights, image_size=image_size)
            lines += ["In a LlamaGen checkout:", "", f"    {command}"]
        lines.append("")
    return "\n".join(lines)


def _evaluation_table(evaluations: list[dict[str, Any]]) -> list[str]:
    if not evaluations:
        return []
    lines = ["## Evaluation", "", "| samples | CFG | FID | IS | precision | recall | reference |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for results in evaluations:
        metrics, sampling = results.get("metrics", {}), results.get("sampling", {})
        reference = (results.get("reference") or {}).get("source") or "none (IS only)"
        cells = [f"{results.get('num_samples', 0):,}", f"{sampling.get('cfg_scale', '?')}"]
        cells += [_number(metrics.get(key)) for key in ("fid", "inception_score", "precision", "recall")]
        lines.append("| " + " | ".join([*cells, f"`{reference}`"]) + " |")
        if results.get("warning"):
            lines.append(f"| {results['warning']} |")
    return [*lines, "", "From `eval/fid.py`'s results.json (every setting is recorded there).", ""]


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
