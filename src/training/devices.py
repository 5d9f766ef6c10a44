"""train.devices: one device, or tf.distribute.MirroredStrategy over several.

With train.devices above 1, Keras trains under MirroredStrategy: each device gets an
equal share of every batch and the gradients are summed.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from src.config import TrainConfig
from src.errors import UserError


def visible_devices() -> list[str]:
    """What train.devices counts: the GPUs TensorFlow sees or, with none, its CPUs (one,
    unless the process split it into logical devices before TensorFlow started)."""
    found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [device.name for device in found]


def distribution(cfg: TrainConfig) -> tf.distribute.Strategy:
    """train.devices as a tf.distribute strategy: TensorFlow's default (one device) for
    1, else MirroredStrategy over the first N visible devices, or all of them."""
    visible = visible_devices()
    count = len(visible) if cfg.devices == "all" else cfg.devices
    if count > len(visible):
        names = ", ".join(name.removeprefix("/device:") for name in visible)
        gpus = "" if "GPU" in names else "; TensorFlow sees no GPU"
        raise UserError(
            f"train.devices is {count}, but {len(visible)} device"
            f"{'s are' if len(visible) > 1 else ' is'} visible ({names}{gpus}); "
            f"set train.devices to at most {len(visible)}, or all"
        )
    if cfg.batch_size % count:
        raise UserError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of train.devices "
            f"({count}), so that each device gets an equal share of every batch; "
            f"set it to {max(1, cfg.batch_size // count) * count}"
        )
    if count == 1:
        return tf.distribute.get_strategy()
    return _mirrored(tuple(visible[:count]))


@functools.cache
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    # One per process and devices: a second MirroredStrategy reuses the first one's
    # collective-op keys, and its all-reduce then fails on the first one's shapes.
    return tf.distribute.MirroredStrategy(list(devices))
