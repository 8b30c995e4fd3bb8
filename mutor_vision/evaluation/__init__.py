"""Evaluation: sampling to images, features, and FID / IS / Precision / Recall."""

from mutor_vision.evaluation.fid import Reference, evaluate, reference_from_folder, reference_from_images
from mutor_vision.evaluation.metrics import frechet_distance, inception_score, precision_recall, statistics
from mutor_vision.evaluation.pipeline import extract_features, inception_extractor, label_list

__all__ = [
    "Reference",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "inception_extractor",
    "inception_score",
    "label_list",
    "precision_recall",
    "reference_from_folder",
    "reference_from_images",
    "statistics",
]
