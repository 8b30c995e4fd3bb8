"""FID, Inception Score and ADM-style Precision/Recall from features, through torch-fidelity.

FID is torch-fidelity's, from float64 statistics on both sides (the ADM reference statistics may be
float32; torch-fidelity asserts equal dtypes). IS is ADM's evaluator's rule, written out: the mean
over chunks of 5,000 images in order (10 at 50,000 samples, which torch-fidelity's 10 splits equal;
at other counts the two differ: docs/evaluation.md). Precision/Recall is torch-fidelity's with k = 3
nearest neighbours in Inception pool features (radii from each set to itself) against the reference
set, as ADM's evaluator, in float64 where ADM computes distances in float16.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def statistics(features: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """mu, sigma (float64) of features (N, D): torch-fidelity's ``fid_features_to_statistics``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics  # lazy: torch-fidelity is a slow import

    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {array.shape}")
    return fid_features_to_statistics(torch.from_numpy(array))


def frechet_distance(stats: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """FID between two (mu, sigma) pairs, both cast to float64 (torch-fidelity asserts equal dtypes)."""
    from torch_fidelity.metric_fid import (  # lazy: torch-fidelity is a slow import
        KEY_METRIC_FID,
        fid_statistics_to_metric,
    )

    mine = {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma")}
    ref = {k: np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma")}
    if mine["mu"].shape != ref["mu"].shape:
        raise ValueError(f"feature sizes differ: samples {mine['mu'].shape} vs reference {ref['mu'].shape}")
    return fid_statistics_to_metric(mine, ref, verbose=False)[KEY_METRIC_FID]


ADM_SPLIT_SIZE = 5000  # ADM's compute_inception_score: images per chunk


def inception_score(logits: Tensor | np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> tuple[float, float]:
    """IS from unbiased logits (N, C), as ADM's evaluator: softmax, then exp of the mean
    KL(p(y|x) ‖ p(y)) within each chunk of ``split_size`` images in order (the last may be shorter);
    the mean over chunks, and their standard deviation."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # A class of probability 0 adds 0 (ADM's float32 softmax rarely yields one; log(0) would be NaN).
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_metrics(logits: Tensor | np.ndarray) -> dict[str, float | str | None]:
    """The IS entries of the results: ``inception_score`` and ``inception_score_std``.

    One image scores exactly 1 against itself: with fewer than two samples the entries are null,
    with the reason in ``inception_score_note`` and in the log, rather than a number that means nothing.
    """
    count = len(logits)
    if count < 2:
        note = f"left out: {count} sample(s); IS needs at least 2"
        log.info("Inception Score %s", note)
        return {"inception_score": None, "inception_score_std": None, "inception_score_note": note}
    mean, std = inception_score(logits)
    return {"inception_score": mean, "inception_score_std": std}


def precision_recall(
    samples: Tensor | np.ndarray, reference: Tensor | np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.; ADM's evaluator): k-NN manifolds of each set.

    torch-fidelity's ``prc_features_to_metric`` on float64 features, in chunks of ``chunk`` rows
    (its default of 10,000 rows holds a 10,000 × 50,000 distance block in memory).
    """
    # lazy: torch-fidelity is a slow import
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    fake = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    real = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if len(fake) <= k or len(real) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples and reference images")
    result = prc_features_to_metric(
        fake, real, prc_neighborhood=k, prc_batch_size=chunk, save_cpu_ram=True, verbose=False
    )
    return result[KEY_METRIC_PRECISION], result[KEY_METRIC_RECALL]
