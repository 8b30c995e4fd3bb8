"""Evaluation: its settings (``config.py``), sample files (``samples.py``), features and references
(``features.py``), metrics (``metrics.py``), and the distributed run that ties them together (``run.py``)."""

from mutor_vision.evaluation.config import EvalConfig
from mutor_vision.evaluation.features import (
    INCEPTION_FILE,
    Reference,
    extract_features,
    inception_extractor,
    reference_from_folder,
    reference_from_images,
    reference_from_npz,
    save_random_inception_weights,
)
from mutor_vision.evaluation.metrics import frechet_distance, inception_score, precision_recall, statistics
from mutor_vision.evaluation.run import Scoring, evaluate, evaluation_state
from mutor_vision.evaluation.samples import label_list

__all__ = [
    "INCEPTION_FILE",
    "EvalConfig",
    "Reference",
    "Scoring",
    "evaluate",
    "evaluation_state",
    "extract_features",
    "frechet_distance",
    "inception_extractor",
    "inception_score",
    "label_list",
    "precision_recall",
    "reference_from_folder",
    "reference_from_images",
    "reference_from_npz",
    "save_random_inception_weights",
    "statistics",
]
