"""The optimizer: the step of src/training/step.py applied as it is, or SGD / Adam."""

from __future__ import annotations

import keras
import numpy as np

from src.config import TrainConfig


def optimizer(cfg: TrainConfig, inverse: np.ndarray | None) -> keras.optimizers.Optimizer:
    """With K-FAC's `inverse`, the Learner computes each step whole (direction and length)
    and hands it to plain SGD with learning rate 1 and no momentum to apply. Without it,
    the optimizer steps on the gradient itself: Adam, or SGD with Nesterov momentum 0.5
    on data scaled for unit curvature."""
    if inverse is not None:
        return keras.optimizers.SGD(1.0)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(cfg.learning_rate)
    return keras.optimizers.SGD(cfg.learning_rate, momentum=0.5, nesterov=True)
