"""Training: the trainer behind ``scaleformer train``, checkpoints, evaluation."""

from scaleformer.train.trainer import TrainConfig, Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError"]
