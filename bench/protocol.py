"""The evaluation protocol against LlamaGen's sample_c2i_ddp.py and ADM's evaluator: the size of each
difference that can be measured without ImageNet (docs/evaluation.md, "Against LlamaGen's and ADM's").

    python bench/protocol.py --out bench/results/protocol_cpu.json              # all parts
    python bench/protocol.py --parts pr_float16,is_splits                       # synthetic only

- ``pr_float16``: precision and recall from features as this code computes them (float64 distances,
  torch-fidelity) against ADM's ``DistanceBlock`` (squared distances computed from float16 features,
  products accumulated in float32, the result and the sums rounded to float16 — its GPU arithmetic,
  emulated), on synthetic 2048-d features shaped like Inception's pool3, 10,000 a side.
- ``is_splits``: the Inception Score in torch-fidelity's 10 splits (this code's rule until it took
  ADM's) against ADM's chunks of 5,000 images (``metrics.inception_score`` now), on synthetic logits:
  the same at 50,000 samples, different at 10,000.
- ``labels``: the digits demo's final MuToR-2D export (``make demo`` first), evaluated with its
  classifier as the feature network: labels i % classes (``--per-class``) against uniform at random
  (the default, LlamaGen's), and two random-label seeds, the sampling noise to read the difference by.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import provenance, save  # bench/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mutor_vision.evaluation.metrics import inception_score, precision_recall  # noqa: E402

DEMO_EXPORT = ROOT / "runs" / "demo" / "mutor2d-seed0" / "checkpoints" / "step_00004800" / "export"


def adm_float16_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``_batch_pairwise_distances`` on float16 inputs: squared distances ``|u|² - 2 u·v + |v|²``
    clipped at 0, each stored in float16 (sums and products accumulated in float32, as on a GPU);
    ADM falls back to float32 when a distance is not finite."""
    u16, v16 = u.half().float(), v.half().float()
    norm_u = (u16 * u16).sum(1).half().float()[:, None]
    norm_v = (v16 * v16).sum(1).half().float()[None, :]
    dot = (u16 @ v16.T).half().float()
    distances = (norm_u - (2 * dot).half().float()).half().float()
    distances = (distances + norm_v).half().float().clamp(min=0)
    if not torch.isfinite(distances).all():
        return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]).clamp(min=0)
    return distances


def adm_precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = 3, chunk: int = 2000) -> tuple:
    """ADM's ``ManifoldEstimator`` (k = 3) over :func:`adm_float16_distances`."""
    fake, real = torch.as_tensor(samples, dtype=torch.float32), torch.as_tensor(reference, dtype=torch.float32)

    def radii(x: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(x), chunk):
            block = torch.cat([adm_float16_distances(x[start : start + chunk], x[c : c + chunk])
                               for c in range(0, len(x), chunk)], dim=1)  # fmt: skip
            out.append(block.kthvalue(k + 1, dim=1).values)  # the k-th neighbour; index 0 is the point itself
        return torch.cat(out)

    def covered(queries: torch.Tensor, manifold: torch.Tensor, manifold_radii: torch.Tensor) -> float:
        inside = []
        for start in range(0, len(queries), chunk):
            block = torch.cat([adm_float16_distances(queries[start : start + chunk], manifold[c : c + chunk])
                               for c in range(0, len(manifold), chunk)], dim=1)  # fmt: skip
            inside.append((block <= manifold_radii[None, :]).any(dim=1))
        return torch.cat(inside).double().mean().item()

    real_radii, fake_radii = radii(real), radii(fake)
    return covered(fake, real, real_radii), covered(real, fake, fake_radii)


def pr_float16(count: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    # Like Inception's pool3: non-negative (averaged ReLU outputs) and of low intrinsic dimension (a
    # 64-d latent); samples a little narrower than the reference, so precision and recall land near
    # what LlamaGen-B reports (about 0.84 and 0.46).
    weights = rng.normal(0, 0.125, (64, 2048))

    def features(spread: float) -> np.ndarray:
        return np.maximum(rng.normal(0, spread, (count, 64)) @ weights + rng.normal(0.3, 0.1, (count, 2048)), 0)

    reference, samples = features(1.0), features(0.95)
    ours = precision_recall(samples, reference, k=3)
    adm = adm_precision_recall(samples.astype(np.float32), reference.astype(np.float32))
    return {
        "features": count,
        "ours_float64": {"precision": ours[0], "recall": ours[1]},
        "adm_float16": {"precision": adm[0], "recall": adm[1]},
        "difference": {"precision": ours[0] - adm[0], "recall": ours[1] - adm[1]},
    }


def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:  # its code, for the comparison
    """ADM's ``compute_inception_score``: softmax, then KL in chunks of ``split_size`` images, in order."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    preds = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def torch_fidelity_ten_splits(logits: np.ndarray) -> float:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    return isc_features_to_metric(torch.as_tensor(logits), splits=10, shuffle=False)[KEY_METRIC_ISC_MEAN]


def is_splits(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows = {}
    for count in (10_000, 50_000):
        # Peaked, class-dependent logits over Inception's 1,008 outputs (an IS of a few tens).
        classes = rng.integers(0, 1000, count)
        logits = rng.normal(0, 1.5, (count, 1008))
        logits[np.arange(count), classes] += rng.normal(6.0, 1.5, count)
        ten = torch_fidelity_ten_splits(logits)
        adm, ours = adm_inception_score(logits), inception_score(logits)[0]
        rows[str(count)] = {
            "torch_fidelity_10_splits": ten,
            "adm_5000_per_split": adm,
            "ours": ours,
            "ten_splits_relative_difference": ten / adm - 1,
            "ours_relative_difference": ours / adm - 1,
        }
    return rows


def labels(samples: int, export: Path) -> dict[str, Any]:
    """The demo export evaluated with per-class and with random labels (and a second random seed)."""
    from demo.digits import digits_extractor, train_classifier
    from demo.run_demo import class_consistency, prepare_data
    from mutor_vision.evaluation import EvalConfig, Scoring, evaluate, reference_from_images
    from mutor_vision.models import GPT, SamplingConfig
    from mutor_vision.models.checkpoint import read_export_tokenizer
    from tokenizer import PaletteTokenizer, to_uint8

    if not export.is_dir():
        raise SystemExit(f"{export}: no demo export (run make demo first)")
    with tempfile.TemporaryDirectory() as tmp:
        _, _, arrays = prepare_data(Path(tmp))  # the demo's digits; its classifier and reference, as it builds them
        extractor = digits_extractor(train_classifier(arrays["train_x"], arrays["train_y"], epochs=15))
        reference = reference_from_images(arrays["train_x"], extractor, 512, "cpu", "digits train split (16×16)")
        palette = PaletteTokenizer.load(read_export_tokenizer(export)["path"])  # the one it was trained with
        model = GPT.from_pretrained(export).eval()
        rows = {}
        for name, per_class, seed in [("per_class_seed0", True, 0), ("random_seed0", False, 0),
                                      ("random_seed1", False, 1), ("per_class_seed1", True, 1)]:  # fmt: skip
            config = EvalConfig(
                Path(tmp) / name, num_samples=samples, per_class=per_class, batch_size=120, feature_batch_size=360,
                sampling=SamplingConfig(cfg_scale=2.0, seed=seed), save_npz=False,
            )  # fmt: skip
            scoring = Scoring(extractor, reference, class_consistency)
            results = evaluate(model, lambda codes: to_uint8(palette.decode(codes)), scoring, config)
            rows[name] = results["metrics"]
    keys = ("fid", "inception_score", "class_consistency", "precision", "recall")
    summary = {
        key: {
            "per_class_minus_random": rows["per_class_seed0"][key] - rows["random_seed0"][key],
            "seed_to_seed_random": rows["random_seed1"][key] - rows["random_seed0"][key],
            "seed_to_seed_per_class": rows["per_class_seed1"][key] - rows["per_class_seed0"][key],
        }
        for key in keys
    }
    return {"export": str(export.relative_to(ROOT)), "samples": samples, "runs": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="pr_float16,is_splits,labels", help="comma-separated parts")
    parser.add_argument("--features", type=int, default=10_000, help="pr_float16: features a side")
    parser.add_argument("--samples", type=int, default=2000, help="labels: samples per evaluation")
    parser.add_argument("--export", type=Path, default=DEMO_EXPORT, help="labels: the demo export")
    parser.add_argument("--out", default=None, help="the results JSON")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict[str, Any] = {**provenance("protocol", "cpu"), "config": {k: str(v) for k, v in vars(args).items()}}
    parts = args.parts.split(",")
    if "pr_float16" in parts:
        result["pr_float16"] = pr_float16(args.features)
        print("pr_float16", result["pr_float16"], flush=True)
    if "is_splits" in parts:
        result["is_splits"] = is_splits()
        print("is_splits", result["is_splits"], flush=True)
    if "labels" in parts:
        result["labels"] = labels(args.samples, args.export)
        print("labels", result["labels"]["summary"], flush=True)
    save(args.out, result)


if __name__ == "__main__":
    main()
