"""Training: configs, the one loop (``loop.py``) and the image task (``c2i.py``), checkpoints, resume."""

from mutor_vision.errors import TrainingDiverged
from mutor_vision.training.c2i import ImageTask, train
from mutor_vision.training.config import DataConfig, EMAConfig, LoopConfig, OptimConfig, TrainConfig
from mutor_vision.training.runtime import TrainResult

__all__ = [
    "DataConfig",
    "EMAConfig",
    "ImageTask",
    "LoopConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "train",
]
