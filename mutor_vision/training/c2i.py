"""The class-conditional image task: next-token, MuToR-1D and MuToR-2D on token shards.

Its data order is a function of (seed, step, rank layout) alone: the steps are cut into fixed data
segments of ``data.segment_steps`` (1000 by default; never ``save_every``, so how often a run saves
changes nothing it trains on), each rank's stream of a segment is seeded by (seed, the segment's first
step, rank), and resuming inside a segment replays its start and skips what was consumed, so the
batches match an uninterrupted run exactly (the loop, ``loop.py``, seeds every other draw).

The cost of a resume: each rank replays at most ``(segment_steps - 1) × accumulation`` micro-batches
through the loader (no forward), i.e. up to ``(segment_steps - 1) × global_batch_size / ranks``
samples (in seconds at the loader's measured rate: docs/imagenet.md). A resume on another number
of ranks is not exact in its data order (the ranks' streams differ); the loop says so when it resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mutor_vision.data import token_loader
from mutor_vision.errors import ConfigError
from mutor_vision.models import GPT, GPTConfig
from mutor_vision.models.card import model_card
from mutor_vision.models.checkpoint import load_state_dict_strict, read_state_dict, save_export
from mutor_vision.seeds import hash_seed
from mutor_vision.shards import Manifest, check_manifest, read_manifest
from mutor_vision.training import loop
from mutor_vision.training.config import TrainConfig
from mutor_vision.training.runtime import TrainResult

log = logging.getLogger(__name__)


class ImageTask:
    """Token grids + class labels -> the combined MuToR loss of a LlamaGen GPT."""

    name = "c2i"

    def __init__(self, config: TrainConfig) -> None:
        if not config.data.root:
            raise ConfigError("data.root: must be set (a folder of token shards with manifest.json)")
        self.config = config
        self.manifest = read_manifest(config.data.root)
        check_manifest(self.manifest, **_expectations(config.model))
        self.warnings = class_count_warnings(self.manifest, config.model.num_classes) + order_warnings(self.manifest)
        self.total_steps = config.steps
        registers = config.model.registers
        self.num_tokens = config.model.num_tokens
        num_registers = (registers.num_registers or self.num_tokens) if registers.enabled else 0
        self.flops_per_sample = config.model.train_flops_per_sample(self.num_tokens + num_registers)
        self._segment: int | None = None
        self._stream: Iterator | None = None

    def summary(self) -> dict[str, str]:
        """The data and model lines of the start-up summary."""
        m, model = self.manifest, self.config.model
        classes = f"{m.num_classes} classes" if m.num_classes else "classes not listed (labels checked as read)"
        data = (
            f"{m.root}: {m.num_samples:,} samples in {len(m.shards)} shards, {classes}, "
            f"grid {m.grid[0]}x{m.grid[1]}, codebook {m.codebook_size}, {m.num_crops} crop(s) per sample"
        )
        registers = model.registers.mode if model.registers.enabled else "none (next-token)"
        name = model.size or "custom size"
        shape = f"{model.n_layer} layers, {model.n_head} heads, dim {model.dim}"
        described = f"GPT ({name}: {shape}), {model.num_classes} classes, registers {registers}"
        return {"data": data, "model": described}

    def build_model(self, fresh: bool) -> GPT:
        model = GPT(self.config.model)
        if self.config.init_from and fresh:
            source = self.config.init_from
            load_state_dict_strict(model, read_state_dict(source, trust=self.config.trust_checkpoint), source)
            log.info("initialised from %s", source)
        return model

    def micro_batches(
        self, step: int, accumulation: int, rank: int, world: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        config = self.config
        # Fixed segments, independent of save_every: the data never depends on when checkpoints are written.
        segment = step - step % config.data.segment_steps
        if segment != self._segment:  # a new segment, or the first step after a resume inside one
            end = min(self.total_steps, segment + config.data.segment_steps)
            self._stream = iter(
                token_loader(
                    config.data.root,
                    batch_size=config.micro_batch_size,
                    num_batches=(end - segment) * accumulation,
                    seed=hash_seed(config.seed, segment),
                    rank=rank,
                    world_size=world,
                    num_workers=config.data.num_workers,
                    shuffle_buffer=config.data.shuffle_buffer,
                    on_error=config.data.on_error,
                    expect=_expectations(config.model),
                )
            )
            self._segment = segment
            for _ in range((step - segment) * accumulation):  # consumed before the resume
                next(self._stream)
        for _ in range(accumulation):
            yield next(self._stream)

    def inputs(self, model: GPT, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> dict:
        tokens, labels = batch
        layout = model.register_layout(tokens.shape[0], generator=generator, device=tokens.device)
        # The mask is built outside the (maybe compiled) forward: BlockMask creation does not trace,
        # and a fresh layout then never recompiles.
        mask = None if layout is None else model.attention_mask(layout)
        return {"tokens": tokens, "labels": labels, "layout": layout, "mask": mask, "return_loss": True}

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
        return batch[0].shape[0], batch[0].numel()

    def export(self, directory: Path, weights: dict[str, torch.Tensor], unwrapped: GPT, step: int) -> None:
        # The tokenizer the shards were made with travels along, so eval/fid.py decodes without flags,
        # and the classes they held, so it samples those by default; the card says it in words.
        manifest, config = self.manifest.raw, self.config
        data = {"num_classes": manifest.get("num_classes"), "classes": manifest.get("classes")}
        training = {
            "step": step,
            "steps": config.steps,
            "data_root": str(config.data.root),
            "global_batch_size": config.global_batch_size,
            "lr": config.optim.lr,
            "seed": config.seed,
            "mixed_precision": config.mixed_precision,
            "ema": directory.name == "export_ema",
        }
        tokenizer = manifest.get("tokenizer")
        title = f"{Path(config.out_dir).name}, step {step:,}" + (" (EMA weights)" if training["ema"] else "")
        card = model_card(title, unwrapped.config, tokenizer, data, training)
        save_export(directory, weights, unwrapped.config, tokenizer, data, training, card)


def order_warnings(manifest: Manifest) -> list[str]:
    """Shards written in class order (``encode_imagenet.py --order sorted``, or an ImageFolder encoded before
    the order was recorded): the stream reads whole shards through a shuffle buffer, so its batches hold a
    few classes at a time. Training runs, and says so once."""
    raw = manifest.raw
    sorted_folder = raw.get("order") == "sorted"
    unrecorded = "order" not in raw and (raw.get("input") or {}).get("kind") == "imagefolder"
    if not (sorted_folder or unrecorded):
        return []
    how = "are in class order" if sorted_folder else "may be in class order (encoded before the order was recorded)"
    return [
        f"the shards of {manifest.root} {how}: each batch then holds the few classes in the shuffle buffer; "
        "encode again with tokenizer/encode_imagenet.py (default --order shuffled) for batches of all classes"
    ]


def class_count_warnings(manifest: Manifest, num_classes: int) -> list[str]:
    """A model with more classes than the data trains (the extra rows stay untrained): say so, never silently.

    More data classes than model classes is an error already (``check_manifest``), and so is any label
    at or above ``model.num_classes`` as it is read (``decode_sample``).
    """
    if manifest.num_classes is not None and manifest.num_classes != num_classes:
        return [
            f"the model has {num_classes} classes (model.num_classes), the data {manifest.num_classes} "
            f"({manifest.path}): {num_classes - manifest.num_classes} class rows will never see a label"
        ]
    return []


def _expectations(model: GPTConfig) -> dict[str, int]:
    return dict(grid_size=model.grid_size, vocab_size=model.vocab_size, num_classes=model.num_classes)


def train(
    config: TrainConfig, resume: str | None = None, allow_change: Sequence[str] = (), force: bool = False
) -> TrainResult:
    """Train per ``config``; ``resume`` is None, ``"auto"`` (newest complete checkpoint) or a path.

    ``allow_change`` names config keys that may differ from the resumed checkpoint's. The shards are
    checked against the model, then the resume against the checkpoint; nothing is written before.
    ``force``: take ``out_dir`` over from another run holding it (``mutor_vision/locks.py``).
    """
    return loop.run(ImageTask(config), config, resume, allow_change, force=force)
