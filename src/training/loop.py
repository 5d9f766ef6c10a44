"""The fit: the curvature probe, K-FAC, the stopping rule's check images and Keras's fit."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from src import streams
from src.config import TrainConfig
from src.errors import UserError
from src.layers import build_model, choose_conv
from src.training.batches import WHITENERS, crops, epoch_steps, training_dataset
from src.training.callbacks import EpochEnd
from src.training.curvature import Preconditioner, top_curvature
from src.training.devices import distribution
from src.training.optimizer import optimizer
from src.training.stopping import NewtonStep, check_images

log = logging.getLogger("train")

VAL_MAX_IMAGES = 128  # per-epoch val_loss uses at most this many held-out images
BIAS_IMAGES = 16  # training images the bias is fitted on after each epoch
PROBE_BATCHES = 4  # the step is sized for the steepest of the first few batches
PRECONDITION_IMAGES = 64  # whole training images the K-FAC estimate is made on


def train(
    images: np.ndarray,
    targets: np.ndarray,
    true_kernel: np.ndarray,
    split: np.ndarray,
    padding: str,
    cfg: TrainConfig,
    seed: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, keras.callbacks.History]:
    """Fit the one-layer model until converged (EpochEnd's rule) or train.max_steps. Returns
    it in the filter's padding, with its fitted bias, ready to predict, and Keras's History
    of the per-epoch logs (loss, val_loss when any image is held out, kernel_mse,
    kernel_rel_error, kernel_change, learning_rate, steps, converged, elapsed_s).

    `images` (N, S, S) and `targets` are arrays or stacks; `split` holds 'train' or
    'val' per row. `cfg` is applied with its recipe (TrainConfig.effective). `callbacks`
    run after EpochEnd, so their logs hold its metrics.
    """
    cfg = cfg.effective()
    keras.utils.set_random_seed(seed)
    strategy = distribution(cfg)
    shares = strategy.num_replicas_in_sync
    kernel_shape = tuple(int(n) for n in true_kernel.shape)
    conv = choose_conv(kernel_shape, cfg.conv)
    train_rows = np.flatnonzero(split == "train")
    val_rows = np.flatnonzero(split == "val")[:VAL_MAX_IMAGES]
    if len(train_rows) == 0:
        raise UserError("no training images: data.val_fraction leaves none; lower it or add images")

    # the steepest of the first batches: a step must be stable on every batch, not the
    # average (the same batches the training dataset starts with)
    probe = crops(
        images,
        targets,
        train_rows,
        kernel_shape,
        padding,
        cfg.batch_size,
        cfg.crop_side(images.shape[1]),
        streams.rng(seed, streams.CROPS),
        shares,
    )
    batches = [x for x, _ in itertools.islice(probe, PROBE_BATCHES)]
    whitened = [np.asarray(WHITENERS[cfg.whiten](x))[..., 0] for x in batches]
    curvature = max(top_curvature(w[..., None], kernel_shape, seed) for w in whitened)
    if not curvature > 0:
        raise UserError(
            "the training images have no contrast to learn from: the first "
            f"{sum(map(len, batches))} training crops are all zero after whitening "
            f"(train.whiten={cfg.whiten}), as flat single-colour photos are; "
            "use photos with edges and texture in data.source"
        )
    scale = 1.0 / math.sqrt(curvature)
    rows = np.sort(train_rows[:PRECONDITION_IMAGES])
    sample = np.asarray(images[rows], dtype=np.float32)[..., None] * scale
    preconditioner = Preconditioner(np.asarray(WHITENERS[cfg.whiten](sample))[..., 0], kernel_shape)
    newton_step = NewtonStep(
        *check_images(images, targets, train_rows, kernel_shape, padding, cfg, scale),
        preconditioner.inverse,
    )
    inverse = None
    if cfg.precondition == "kfac" and cfg.optimizer == "sgd":
        inverse = preconditioner.inverse
        # the step is sized for the steepest probe batch, as for plain SGD: the estimate
        # is of all images, and one batch of crops can be steeper in some direction
        steepest = max(
            preconditioner.top_curvature(w * scale, kernel_shape, seed) for w in whitened
        )
        inverse = inverse / max(steepest, 1.0)
        log.info("K-FAC: the steepest probe batch has preconditioned curvature %.3g", steepest)
    read_errors: list[UserError] = []
    dataset = training_dataset(
        images, targets, train_rows, kernel_shape, padding, cfg, seed, scale, read_errors, shares
    )
    steps = epoch_steps(len(train_rows), cfg, shares)
    epochs = -(-cfg.max_steps // steps)
    log.info(
        "conv %s, whiten %s, precondition %s, %d train / %d val images, %d steps per epoch "
        "(at most %d), data scaled by %.3g for unit curvature",
        conv,
        cfg.whiten,
        cfg.precondition if inverse is not None else "none",
        len(train_rows),
        len(val_rows),
        steps,
        cfg.max_steps,
        scale,
    )

    if shares > 1:
        log.info(
            "training on %d devices (%s) with tf.distribute.MirroredStrategy, "
            "%d images of each batch per device",
            shares,
            ", ".join(strategy.extended.worker_devices),
            cfg.batch_size // shares,
        )
    with strategy.scope():  # the variables live on every device, mirrored
        model = build_model(kernel_shape, conv, "valid", use_bias=False)
        model.compile(optimizer=optimizer(cfg, inverse), loss="mse")
    final = build_model(kernel_shape, conv, padding)
    on_epoch = EpochEnd(
        final, true_kernel, images, targets, train_rows[:BIAS_IMAGES], val_rows, cfg, newton_step
    )
    try:
        history = model.fit(
            dataset,
            epochs=epochs,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
            callbacks=[on_epoch, *callbacks],
        )
    except tf.errors.OpError:
        if read_errors:
            raise read_errors[0] from None
        raise
    return final, history
