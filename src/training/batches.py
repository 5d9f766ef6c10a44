"""The batches training sees: random crops with their targets, whitened in pairs.

Natural images have a ~1/f² power spectrum, which makes the loss badly conditioned.
Input and target are filtered with the same derivative filters; filters commute, so
the optimum is unchanged, and the spectrum becomes ~flat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from src import streams
from src.config import TrainConfig
from src.errors import UserError
from src.normal_equations import four
from src.padding import target_offset


def _gradient(a: tf.Tensor) -> tf.Tensor:
    # x- and y-differences on the same (H-1, W-1) grid, stacked on the batch axis:
    # their summed power grows as |f|², which flattens a 1/f² spectrum.
    dx = a[:, 1:, 1:] - a[:, 1:, :-1]
    dy = a[:, 1:, 1:] - a[:, :-1, 1:]
    return tf.concat([dx, dy], axis=0)


def _laplacian(a: tf.Tensor) -> tf.Tensor:
    return (
        a[:, :-2, 1:-1] + a[:, 2:, 1:-1] + a[:, 1:-1, :-2] + a[:, 1:-1, 2:] - 4.0 * a[:, 1:-1, 1:-1]
    )


WHITENERS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "gradient": _gradient,
    "laplacian": _laplacian,
    "none": lambda a: a,
}


def whiten_pair(x: tf.Tensor, target: tf.Tensor, whiten: str) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the same whitening filter to input and target ('valid' geometry kept)."""
    f = WHITENERS[whiten]
    return f(x), f(target)


def crops(
    images: np.ndarray,
    targets: np.ndarray,
    rows: np.ndarray,
    kernel_shape: tuple[int, int],
    padding: str,
    batch_size: int,
    side: int,
    rng: np.random.Generator,
    shares: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of batches: the training rows in a seeded order, one random side×side
    crop each (TrainConfig.crop_side), with its target cut out in 'valid' geometry.
    Reads the stacks batch by batch, so memory does not grow with the dataset.

    Every batch holds a multiple of `shares` images, one equal share per device
    (tf.distribute fails on unequal ones): a smaller last batch is cut down to one,
    leaving out fewer than `shares` images of the epoch, a different few each epoch."""
    size = images.shape[1]
    kh, kw = kernel_shape
    top, left = target_offset(kernel_shape, padding)
    order = rng.permutation(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        batch = batch[: len(batch) - len(batch) % shares]
        if not len(batch):
            return
        offsets = rng.integers(0, size - side + 1, size=(len(batch), 2))
        windows = list(zip(batch, offsets))
        x = np.stack([images[i, oy : oy + side, ox : ox + side] for i, (oy, ox) in windows])
        t = np.stack(
            [
                targets[
                    i, top + oy : top + oy + side - kh + 1, left + ox : left + ox + side - kw + 1
                ]
                for i, (oy, ox) in windows
            ]
        )
        yield four(x).astype(np.float32), four(t).astype(np.float32)


def training_dataset(
    images,
    targets,
    rows,
    kernel_shape,
    padding,
    cfg: TrainConfig,
    seed: int,
    scale: float = 1.0,
    read_errors: list[UserError] | None = None,
    shares: int = 1,
) -> tf.data.Dataset:
    """The endless whitened, scaled batches. A UserError while
    reading a batch (a corrupted stage file) is appended to `read_errors`: tf.data itself
    only raises an UnknownError with the traceback in its message. `shares`: see crops."""
    side = cfg.crop_side(images.shape[1])
    whiten = cfg.whiten

    def epochs():
        # Every iterator of the dataset starts the same stream: Keras under tf.distribute
        # reads one batch from a first iterator to build the model, then trains on a second.
        rng = streams.rng(seed, streams.CROPS)
        try:
            while True:
                yield from crops(
                    images, targets, rows, kernel_shape, padding, cfg.batch_size, side, rng, shares
                )
        except UserError as exc:
            if read_errors is not None:
                read_errors.append(exc)
            raise

    spec = (
        tf.TensorSpec((None, None, None, None), tf.float32),
        tf.TensorSpec((None, None, None, None), tf.float32),
    )
    dataset = (
        tf.data.Dataset.from_generator(epochs, output_signature=spec)
        .map(lambda x, t: whiten_pair(x * scale, t * scale, whiten))
        .prefetch(2)
    )
    return dataset


def epoch_steps(train_images: int, cfg: TrainConfig, shares: int = 1) -> int:
    """Optimizer steps in an epoch: one pass over the training images, but at least
    train.min_epoch_steps (a few photos then give several crops each an epoch). A
    last batch smaller than `shares` is not a step (see crops)."""
    full, rest = divmod(train_images, cfg.batch_size)
    return max(full + (rest >= shares), cfg.min_epoch_steps)
