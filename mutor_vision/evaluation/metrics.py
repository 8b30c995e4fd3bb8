"""FID, Inception Score and ADM-style Precision/Recall from features (ecosystem.md §1).

FID and IS go through torch-fidelity's own functions (FID with float64 statistics on both sides,
IS with 10 in-order splits as ADM). Precision/Recall follow ADM's evaluator: k = 3 nearest
neighbours in Inception pool features, radii from each set to itself, against the reference set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def statistics(features: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """mu, sigma (float64) of features (N, D)."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {array.shape}")
    return {"mu": array.mean(axis=0), "sigma": np.cov(array, rowvar=False)}


def frechet_distance(stats: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """FID between two (mu, sigma) pairs, both cast to float64 (torch-fidelity asserts equal dtypes)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mine = {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma")}
    ref = {k: np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma")}
    if mine["mu"].shape != ref["mu"].shape:
        raise ValueError(f"feature sizes differ: samples {mine['mu'].shape} vs reference {ref['mu'].shape}")
    return fid_statistics_to_metric(mine, ref, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS mean and std over ``splits`` in-order splits (ADM), from unbiased logits (N, C)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=splits, shuffle=False)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def _radii(features: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the set's manifold radius)."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # + 1: the point itself is at 0
    return torch.cat(radii)


def _coverage(queries: Tensor, manifold: Tensor, radii: Tensor, chunk: int) -> float:
    """Fraction of ``queries`` inside at least one ball (manifold[j], radii[j])."""
    inside = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start : start + chunk], manifold)
        inside.append((distances <= radii[None]).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(
    samples: Tensor | np.ndarray, reference: Tensor | np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al.; ADM's evaluator): k-NN manifolds of each set."""
    fake = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    real = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if len(fake) <= k or len(real) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples and reference images")
    precision = _coverage(fake, real, _radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _radii(fake, k, chunk), chunk)
    return precision, recall
