"""One training step's time against kernel size, direct Conv2D vs FFTConv2D.

The step is the one src.training.train runs: the model of build_model in 'valid'
geometry, the default optimizer (with kfac, the gradient times a taps×taps matrix), a
batch of whitened random crops of real grayscale images. This is what
src.layers.DIRECT_MAX_TAPS ('auto') should follow.
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np
import tensorflow as tf

from benchmarks.learning import gray
from src import filtering, layers, training
from src.config import TrainConfig

log = logging.getLogger("bench.steps")

WARMUP = 2  # steps before timing: the first traces the graph


def batch(
    images: np.ndarray,
    kernel_shape: tuple[int, int],
    crop: int,
    count: int,
    whiten: str,
    rng: np.random.Generator,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`count` random crops and their targets under a random kernel, whitened."""
    size = images.shape[1]
    picks = rng.choice(len(images), size=count, replace=len(images) < count)
    offsets = rng.integers(0, size - crop + 1, size=(count, 2))
    x = gray(np.stack([images[i, y : y + crop, x : x + crop] for i, (y, x) in zip(picks, offsets)]))
    target = gray(filtering.correlate(x, rng.standard_normal(kernel_shape), "valid"))
    return training.whiten_pair(
        tf.constant(x[..., None], tf.float32), tf.constant(target[..., None], tf.float32), whiten
    )


def step_times(
    images: np.ndarray, sizes: list[int], cfg: TrainConfig, crop: int, repeats: int, seed: int = 0
) -> list[dict]:
    """Median seconds per train step for each kernel size and conv, on the same batch."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        shape = (size, size)
        x, t = batch(images, shape, crop, cfg.batch_size, cfg.whiten, rng)
        row = {"kernel": size, "taps": size * size, "auto": layers.choose_conv(shape, "auto")}
        # the step costs the same whatever the inverse Hessian holds: the identity stands in
        # for it (its eigendecomposition at 64×64 takes longer than the steps measured)
        kfac = cfg.precondition == "kfac" and cfg.optimizer == "sgd"
        inverse = np.eye(size * size, dtype=np.float32) if kfac else None
        for conv in ("direct", "fft"):
            model = layers.build_model(shape, conv, "valid", use_bias=False)
            model.compile(optimizer=training.optimizer(cfg, inverse), loss="mse")
            seconds = []
            for _ in range(WARMUP + repeats):
                start = time.perf_counter()
                model.train_on_batch(x, t)
                seconds.append(time.perf_counter() - start)
            row[f"{conv}_first_s"] = round(seconds[0], 3)  # tracing the step, and oneDNN's
            seconds = seconds[WARMUP:]  # first run of a new conv shape
            row[f"{conv}_ms"] = round(1000 * statistics.median(seconds), 3)
            row[f"{conv}_ms_all"] = [round(1000 * s, 3) for s in seconds]
        row["faster"] = "direct" if row["direct_ms"] <= row["fft_ms"] else "fft"
        row["fft_speedup"] = round(row["direct_ms"] / row["fft_ms"], 3)
        log.info(
            "%2d×%-2d: direct %8.2f ms, fft %7.2f ms per step; auto picks %s",
            size,
            size,
            row["direct_ms"],
            row["fft_ms"],
            row["auto"],
        )
        rows.append(row)
    return rows
