"""Training: config, optimizer and schedule, checkpoints, and the loop."""

from mutor_vision.training.config import DataConfig, EMAConfig, OptimConfig, TrainConfig
from mutor_vision.training.trainer import TrainingDiverged, TrainResult, train

__all__ = ["DataConfig", "EMAConfig", "OptimConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "train"]
