"""One evaluation run: sample across ranks, decode, measure, write, and (rank 0) compute the metrics.

``eval/fid.py`` is the command line around :func:`evaluate`; the demo calls it with its own feature
extractor. Ranks sample disjoint index slices of one fixed label list. Per batch the GPU samples
the codes, decodes them to uint8 images and computes their features from memory (PNG is lossless,
so these equal the files' features), while background threads write the PNGs; samples kept from
an earlier run are read back for their features. Rank 0 gathers the features and computes the
metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import Tensor
from tqdm.auto import tqdm

from mutor_vision import __version__
from mutor_vision.core.device import to_device
from mutor_vision.core.drafting import DecodeStats
from mutor_vision.errors import ConfigError
from mutor_vision.evaluation.config import EvalConfig
from mutor_vision.evaluation.features import Reference, extract_features, extractor_record, features_on_device
from mutor_vision.evaluation.metrics import frechet_distance, inception_score_metrics, precision_recall, statistics
from mutor_vision.evaluation.samples import PngWriter, label_list, missing_indices, read_pngs, save_grid, write_npz
from mutor_vision.evaluation.timing import NO_TIMINGS, SAMPLE, Timings
from mutor_vision.files import atomic_write, atomic_write_json, check_stamp, storage_faults
from mutor_vision.models import GPT, generate, generate_drafted, sample_uniforms
from mutor_vision.peers import peers
from mutor_vision.processes import DEFAULT_COLLECTIVE_TIMEOUT_S, process_state
from mutor_vision.seeds import hash_seed

log = logging.getLogger(__name__)
Decode = Callable[[Tensor], Tensor]  # codes (B, h, w) -> uint8 images (B, 3, H, W) on the same device
# The caller's metrics from the labels (N,) and the features (pool, logits): the demo's class consistency.
ExtraMetrics = Callable[[np.ndarray, tuple[np.ndarray, np.ndarray | None]], dict[str, float]]
SETTINGS = "sampling_settings.json"
RANDOM_WARNING = (
    "the Inception weights are RANDOM (--inception-weights random:SEED): a smoke test of the pipeline; "
    "every metric of this run is meaningless and must not be reported"
)


def evaluation_state(device: str = "auto", collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S):
    """The process state for evaluation: gloo on CPU, and collectives that wait ``collective_timeout_s``.

    Ranks reach the end at very different times (a resumed run leaves each rank a different number
    of missing samples): they wait for each other through :func:`~mutor_vision.peers.peers`, for as
    long as every rank lives, and only then gather, so the timeout can be short.
    """
    return process_state(device, timeout=timedelta(seconds=collective_timeout_s))


@dataclasses.dataclass
class Scoring:
    """What the samples are measured with: the feature network (pool features, and logits for the
    Inception Score), the reference set (FID, precision, recall; None: the Inception Score only),
    and metrics of the caller's own from the same features."""

    extractor: torch.nn.Module
    reference: Reference | None = None
    extra_metrics: ExtraMetrics | None = None


@dataclasses.dataclass
class RankSamples:
    """What one rank sampled and measured; rank 0 gathers one from every rank."""

    indices: np.ndarray  # the sample indices of this rank, in order
    features: list[np.ndarray]  # one array per feature (pool, logits), a row per index
    written: int  # PNGs written by this run (the rest were kept from an earlier one)
    drafting: DecodeStats  # the forwards and tokens of register drafting (zero without it)


def sample_and_measure(
    model: GPT,
    decode: Decode,
    extractor: torch.nn.Module,
    labels: np.ndarray,
    indices: Sequence[int],
    config: EvalConfig,
    show_progress: bool = True,
    timings: Timings | None = None,
) -> RankSamples:
    """Sample, write and measure ``indices`` (classes ``labels[indices]``) into ``config.out_dir/samples``.

    Samples whose PNG is missing or broken are sampled; sample i's random numbers derive from
    (seed, i) alone, so a rerun reproduces exactly the images an uninterrupted run would have
    written, whatever batches they fall into (with ``draft_tokens > 1``, register drafting draws its
    own numbers per batch: the same distribution, but a refill is no longer the same image).

    ``config.overlap`` (default: on CUDA) collects each batch's images and features one batch late: on
    CUDA the sampling runs on a high-priority stream and batch i is decoded, measured and copied to
    pinned host memory on a second stream while batch i + 1 samples, with no host sync between them
    (the decoder's large kernels fill the SMs that the sampler's small ones leave idle; its priority
    lets the sampler's go first). The same kernels run on the same inputs as in the serial order
    (``overlap=False``), so every output is the same; on the CPU it only changes when a batch is
    collected. An error or Ctrl-C still writes the batch in flight. ``timings``
    (bench/eval_pipeline.py) records where the time goes.
    """
    folder = config.out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    extractor = extractor.to(device).eval()
    overlap = device.type == "cuda" if config.overlap is None else config.overlap
    sampler = measurer = None  # the streams of the overlap on CUDA (None: the current stream)
    if overlap and device.type == "cuda":
        sampler = torch.cuda.Stream(device, priority=SAMPLING_PRIORITY)
        measurer = torch.cuda.Stream(device)
        sampler.wait_stream(torch.cuda.current_stream(device))
    timings = timings or NO_TIMINGS
    measure = _Measure(decode, extractor, config.feature_batch_size, sampler, measurer, timings, config.batch_size)
    todo = missing_indices(folder, indices, verify=True)
    rows: dict[int, list[np.ndarray]] = {}
    drafting = DecodeStats()
    timings.begin()
    with PngWriter(folder) as writer:

        def collect(measured: _Measured) -> None:
            with timings.wait("results"):
                images, features = measured.result()
            writer.submit(measured.batch, images)
            rows.update({index: [f[row] for f in features] for row, index in enumerate(measured.batch)})

        pending: _Measured | None = None
        try:
            starts = range(0, len(todo), config.batch_size)
            for number, start in enumerate(tqdm(starts, disable=not show_progress, unit="batch", desc="sampling")):
                batch = todo[start : start + config.batch_size]
                peers().check()  # a lost machine stops this one between batches, not at the gather
                with _on(sampler), timings.part(SAMPLE, number):
                    codes = _sample_batch(model, labels[batch], batch, config, drafting)
                measured = measure(codes, batch, number)
                if not overlap:
                    collect(measured)
                    continue
                previous, pending = pending, measured
                if previous is not None:
                    collect(previous)
        except BaseException:
            if pending is not None:  # computed or in flight: written, not lost (best effort)
                with contextlib.suppress(Exception):
                    collect(pending)
            raise
        if pending is not None:
            collect(pending)
    for stream in (sampler, measurer):
        if stream is not None:  # what follows on the current stream sees all their work
            torch.cuda.current_stream(device).wait_stream(stream)
    timings.add_wait("png_queue", writer.waited_s)
    timings.add_wait("png_drain", writer.drain_s)
    timings.end()
    kept = [int(i) for i in indices if int(i) not in rows]
    for start in tqdm(range(0, len(kept), 1024), disable=not show_progress or not kept, desc="features of kept PNGs"):
        chunk = kept[start : start + 1024]
        features = extract_features(extractor, read_pngs(folder, chunk), config.feature_batch_size, device)
        rows.update({index: [f[row] for f in features] for row, index in enumerate(chunk)})
    columns = len(next(iter(rows.values()))) if rows else 0
    features = [np.stack([rows[int(i)][c] for i in indices]) for c in range(columns)]
    # The writer waited for every PNG and raised if one failed: all of todo is written.
    return RankSamples(np.asarray(indices, dtype=np.int64), features, len(todo), drafting)


def _sample_batch(
    model: GPT, labels: np.ndarray, batch: list[int], config: EvalConfig, drafting: DecodeStats
) -> Tensor:
    """The codes (B, h, w) of one batch, on the model's device (on CUDA: queued, not waited for)."""
    device = next(model.parameters()).device
    labels = to_device(torch.as_tensor(labels), device)
    try:
        if config.draft_tokens > 1:  # drafting draws its own numbers: seeded by (seed, the batch's first index)
            sampling = config.sampling.replace(seed=hash_seed(config.sampling.seed, batch[0]))
            return generate_drafted(model, labels, sampling, config.draft_tokens, drafting)
        uniform = to_device(sample_uniforms(config.sampling.seed, batch, model.config.num_tokens), device)
        return generate(model, labels, config.sampling, uniform, compile=config.compile and device.type == "cuda")
    except torch.OutOfMemoryError:
        raise ConfigError(_OOM.format(size=config.batch_size)) from None


_OOM = "--batch-size {size}: a batch does not fit in GPU memory with this model; lower --batch-size"
SAMPLING_PRIORITY = -1  # CUDA stream priority of the overlapped sampling (lower is higher; 0 is the default's)


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


@dataclasses.dataclass
class _Measured:
    """One batch's uint8 images (B, H, W, 3) and features, on the host once ``done`` has passed."""

    batch: list[int]
    images: np.ndarray
    features: list[np.ndarray]
    done: torch.cuda.Event | None = None  # None: already on the host

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """The images (views of pinned memory, for the PNG writer) and the features (copied out of it)."""
        if self.done is None:
            return self.images, self.features
        self.done.synchronize()
        return self.images, [np.array(feature) for feature in self.features]


@dataclasses.dataclass
class _Measure:
    """Decode a batch's codes, compute the features, bring both to the host: at once, or queued on ``stream``."""

    decode: Decode
    extractor: torch.nn.Module
    feature_batch_size: int
    sampler: torch.cuda.Stream | None  # where the codes are sampled
    stream: torch.cuda.Stream | None  # where they are measured (None: now, on the current stream)
    timings: Timings
    batch_size: int  # for the out-of-memory message

    def __call__(self, codes: Tensor, batch: list[int], number: int) -> _Measured:
        try:
            if self.stream is None:
                return self._now(codes, batch, number)
            return self._queued(codes, batch, number)
        except torch.OutOfMemoryError:
            raise ConfigError(_OOM.format(size=self.batch_size)) from None

    def _now(self, codes: Tensor, batch: list[int], number: int) -> _Measured:
        with torch.no_grad(), self.timings.part("decode", number):
            images = self.decode(codes)
        with self.timings.part("features", number):
            features = features_on_device(self.extractor, images, self.feature_batch_size)
        with self.timings.part("copy", number):
            return _Measured(batch, images.permute(0, 2, 3, 1).cpu().numpy(), [f.cpu().numpy() for f in features])

    def _queued(self, codes: Tensor, batch: list[int], number: int) -> _Measured:
        stream = self.stream
        stream.wait_stream(self.sampler or torch.cuda.current_stream(codes.device))  # the codes are ready
        with torch.cuda.stream(stream), torch.no_grad():
            codes.record_stream(stream)  # its memory is not reused before this stream is done with it
            with self.timings.part("decode", number):
                images = self.decode(codes)
            with self.timings.part("features", number):
                features = features_on_device(self.extractor, images, self.feature_batch_size)
            with self.timings.part("copy", number):
                host = _pinned_copy(images.permute(0, 2, 3, 1))
                pinned = [_pinned_copy(feature) for feature in features]
            done = torch.cuda.Event()
            done.record(stream)
        return _Measured(batch, host.numpy(), [f.numpy() for f in pinned], done)


def _pinned_copy(tensor: Tensor) -> Tensor:
    """A copy into pinned host memory (contiguous), queued on the current stream."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def evaluate(
    model: GPT, decode: Decode, scoring: Scoring, config: EvalConfig, timings: Timings | None = None
) -> dict[str, Any] | None:
    """Sample ``config.num_samples`` images across ranks into ``config.out_dir``, then (rank 0) compute
    the metrics with ``scoring``.

    Returns the results (also written to ``out_dir/results.json``) on rank 0, None elsewhere.
    Samples already in ``out_dir/samples`` must come from the same model and settings (the stamp,
    ``sampling_settings.json``: :meth:`EvalConfig.stamp`); a rerun samples only the missing or broken
    ones. ``decode`` turns codes into uint8 images; ``config.decode_precision`` names what it computes
    in. ``timings``: see :func:`sample_and_measure`.
    """
    state = evaluation_state(config.device, config.collective_timeout_s)
    if config.num_samples < state.num_processes:
        raise ConfigError(
            f"num_samples ({config.num_samples}) must be at least the number of ranks ({state.num_processes})"
        )
    model = model.to(state.device)
    config = config.for_model(model)
    if config.compile and state.device.type != "cuda":
        log.info("compile: the CUDA-graph decode needs CUDA; sampling on the CPU runs eager")
    random_weights = extractor_record(scoring.extractor)["random_weights"]
    if random_weights:
        log.warning(RANDOM_WARNING)
    out_dir = config.out_dir
    check_folder(model, config)  # every rank checks, the main records
    if state.is_main_process:
        check_folder(model, config, write=True)
    peers().wait("stamp")
    labels = label_list(config.num_samples, config.num_classes, per_class=config.per_class, seed=config.sampling.seed)
    mine = np.arange(config.num_samples)[state.process_index :: state.num_processes]
    start = time.perf_counter()
    ranks = sample_and_measure(
        model, decode, scoring.extractor, labels, mine, config, state.is_local_main_process, timings
    )
    seconds = time.perf_counter() - start
    peers().wait("sampled")  # every rank done (however long the slowest takes) before the gather's collective
    gathered: list[RankSamples] = gather_object([ranks])
    if not state.is_main_process:
        return None
    order = np.concatenate([rank.indices for rank in gathered])
    inverse = np.argsort(order)
    if not np.array_equal(order[inverse], np.arange(config.num_samples)):
        raise RuntimeError("ranks did not cover every sample index exactly once")
    columns = len(gathered[0].features)
    features = [np.concatenate([rank.features[c] for rank in gathered])[inverse] for c in range(columns)]
    results = _results(gathered, config, scoring.extractor, seconds)
    if random_weights:
        results["warning"] = RANDOM_WARNING
    if config.draft_tokens > 1:
        total = sum((rank.drafting for rank in gathered), DecodeStats())
        results["drafting"] = {"draft_tokens": config.draft_tokens, "tokens_per_forward": total.tokens_per_forward}
    pool, logits = features[0], (features[1] if len(features) > 1 else None)
    results["metrics"] = _metrics(pool, logits, labels, scoring)
    if scoring.reference is not None:
        results["reference"] = scoring.reference.record()
    with storage_faults(out_dir, "cannot write the evaluation's outputs"):  # a full disk: exit 5, samples kept
        atomic_write(out_dir / "labels.npy", lambda tmp: _save_npy(tmp, labels))
        if config.save_npz:
            write_npz(out_dir / "samples", config.num_samples, out_dir / "samples.npz")
        save_grid(read_pngs(out_dir / "samples", range(min(config.num_samples, 64))), out_dir / "grid.png")
        atomic_write_json(out_dir / "results.json", results)
    log.info("metrics: %s", json.dumps(results["metrics"]))
    if random_weights:
        log.warning(RANDOM_WARNING)
    return results


def check_folder(model: GPT, config: EvalConfig, write: bool = False) -> None:
    """Refuse (``ConfigError``, naming the differing settings) an ``out_dir`` holding samples made with
    another model or other settings; with ``write``, record this run's stamp. ``config``: resolved
    against the model (:meth:`EvalConfig.for_model`)."""
    out_dir = config.out_dir
    stamp = (out_dir / SETTINGS, config.stamp(model), any((out_dir / "samples").glob("*.png")))
    remedy = "use another --out, or delete it to start over"
    check_stamp(*stamp, remedy=remedy, write=write, defaults=EvalConfig.stamp_defaults(model))


def _results(gathered: list[RankSamples], config: EvalConfig, extractor: torch.nn.Module, seconds: float) -> dict:
    """What ``results.json`` records besides the metrics: counts per rank, every setting, timing."""
    settings = config.record()
    return {
        "package": {"name": "mutor-vision", "version": __version__},
        "num_samples": settings.pop("num_samples"),
        "written_this_run": int(sum(rank.written for rank in gathered)),
        "per_rank": [len(rank.indices) for rank in gathered],
        "world_size": len(gathered),
        "sampling": settings.pop("sampling"),
        "features": {**extractor_record(extractor), "batch_size": config.feature_batch_size, "tf32": False},
        "sample_and_measure_seconds_this_run": seconds,
        **settings,
        **config.notes,
    }


def _metrics(pool: np.ndarray, logits: np.ndarray | None, labels: np.ndarray, scoring: Scoring) -> dict[str, float]:
    metrics: dict[str, float] = {}
    reference = scoring.reference
    if reference is not None:
        metrics["fid"] = frechet_distance(statistics(pool), {"mu": reference.mu, "sigma": reference.sigma})
        if reference.features is not None:
            metrics["precision"], metrics["recall"] = precision_recall(pool, reference.features, k=3)
    if logits is not None:
        metrics.update(inception_score_metrics(logits))  # null, with a note, below 2 samples
    if scoring.extra_metrics is not None:
        metrics.update(scoring.extra_metrics(labels, (pool, logits)))
    return metrics


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as stream:  # a file object: numpy would append .npy to the temp name
        np.save(stream, array)
