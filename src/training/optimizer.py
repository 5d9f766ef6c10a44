"""The optimizer: SGD with Nesterov momentum, K-FAC-preconditioned, or Adam."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from src.config import TrainConfig


class PreconditionedSGD(keras.optimizers.SGD):
    """SGD on the kernel with its gradient multiplied by a fixed inverse Hessian (K-FAC for
    a single linear conv layer). The transform is linear, so under tf.distribute it can
    come before the gradients of the devices are summed."""

    def __init__(self, inverse: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.inverse = tf.constant(inverse, tf.float32)

    def apply(self, grads, trainable_variables=None):
        grads = [
            tf.reshape(tf.linalg.matvec(self.inverse, tf.reshape(g, [-1])), tf.shape(g))
            for g in grads
        ]
        return super().apply(grads, trainable_variables)


def optimizer(cfg: TrainConfig, inverse: np.ndarray | None) -> keras.optimizers.Optimizer:
    """A constant learning rate (EpochEnd lowers it on a plateau). With `inverse`, the
    K-FAC-preconditioned SGD."""
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(cfg.learning_rate)
    # momentum 0.5, not 0.9: batches differ in curvature, and heavy momentum carries
    # one batch's step into the next (in a sweep, smiley reached 7e-9 in one epoch of
    # 480 images with 0.5 and 6e-4 with 0.9)
    if inverse is not None:
        return PreconditionedSGD(
            inverse, learning_rate=cfg.learning_rate, momentum=0.5, nesterov=True
        )
    return keras.optimizers.SGD(cfg.learning_rate, momentum=0.5, nesterov=True)
