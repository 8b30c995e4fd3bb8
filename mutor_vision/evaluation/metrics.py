"""FID, Inception Score and ADM-style Precision/Recall from features, through torch-fidelity.

Every metric is torch-fidelity's own function: FID from float64 statistics on both sides (the ADM
reference statistics may be float32; torch-fidelity asserts equal dtypes), IS with 10 in-order
splits as ADM, Precision/Recall with k = 3 nearest neighbours in Inception pool features (radii
from each set to itself) against the reference set, as ADM's evaluator.
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


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` in-order splits (ADM), from unbiased logits (N, C)."""
    # lazy: torch-fidelity is a slow import
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=splits, shuffle=False)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def inception_score_metrics(logits: Tensor | np.ndarray, splits: int = 10) -> dict[str, float | str | None]:
    """The IS entries of the results: ``inception_score`` and ``inception_score_std``.

    With no more samples than splits, every split holds at most one image, and one image scores
    exactly 1 against itself (fewer give NaN): the entries are then null, with the reason in
    ``inception_score_note`` and in the log, rather than a number that means nothing.
    """
    count = len(logits)
    if count <= splits:
        note = f"left out: {count} samples, IS with {splits} splits needs more than {splits}"
        log.info("Inception Score %s", note)
        return {"inception_score": None, "inception_score_std": None, "inception_score_note": note}
    mean, std = inception_score(logits, splits=splits)
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
