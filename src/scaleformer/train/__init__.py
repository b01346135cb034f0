"""Training: the trainer behind ``scaleformer train``, checkpoints, evaluation. Names load on first use, so
that ``scaleformer.train.options`` (the command's flags) is read without importing torch."""

__all__ = ["TrainConfig", "Trainer", "TrainingError"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from scaleformer.train.options import TrainConfig

        return TrainConfig
    if name in ("Trainer", "TrainingError"):
        from scaleformer.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'scaleformer.train' has no attribute {name!r}")
