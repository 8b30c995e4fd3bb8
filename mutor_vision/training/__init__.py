"""Training: config, optimizer and schedule, checkpoints, and the loop."""

from mutor_vision.training.config import DataConfig, EMAConfig, OptimConfig, TrainConfig
from mutor_vision.training.runtime import TrainingDiverged, TrainResult
from mutor_vision.training.trainer import train

__all__ = ["DataConfig", "EMAConfig", "OptimConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "train"]
