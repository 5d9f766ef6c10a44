"""A single linear convolution layer learns the kernel from (grayscale, target) pairs.

The model is the original experiment's: one Conv2D filter of the kernel's size
with a bias, no activation, trained with a mean-squared-error loss. Four things
make it fast and exact on 2 CPU cores:

- conv: a 32×32 Conv2D is slow on a CPU, so large kernels use FFTConv2D, the
  same linear map computed with FFTs (same weights, outputs and gradients).
- whiten: natural images have a ~1/f² power spectrum, which makes the loss badly
  conditioned. We filter input and target with the same derivative filters;
  filters commute, so the optimum is unchanged, and the spectrum becomes ~flat.
- scale: whitened input and target are multiplied by one constant chosen so that
  the loss's largest curvature in the kernel is 1 (measured on a few batches
  before training). The optimum is unchanged, and the same learning_rate is
  stable for any whitening, kernel size and image contrast.
- bias: whitening removes constants, so the bias has nothing to fit in whitened
  space (and its curvature, 2 at any scale, would make the step unstable). SGD
  trains the kernel; after each epoch the bias is set to its least-squares value
  for that kernel, the mean residual on training images in the original space.

With train.devices above 1, Keras trains under tf.distribute.MirroredStrategy:
each device gets an equal share of every batch and the gradients are summed.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from scipy import fft, signal
from scipy.sparse.linalg import LinearOperator, eigsh

from src import streams
from src.config import TrainConfig
from src.errors import UserError
from src.layers import build_model, choose_conv, learned_kernel
from src.padding import target_offset

log = logging.getLogger("train")

VAL_MAX_IMAGES = 128  # per-epoch val_loss uses at most this many held-out images
BIAS_IMAGES = 16  # training images the bias is fitted on after each epoch
PROBE_BATCHES = 4  # the step is sized for the steepest of the first few batches
EXACT_HESSIAN_MAX_TAPS = 121  # curvature from the exact Hessian up to 11×11, estimated above


# --- whitening -----------------------------------------------------------------


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


# --- data ----------------------------------------------------------------------


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
        yield x[..., None].astype(np.float32), t[..., None].astype(np.float32)


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
) -> tuple[tf.data.Dataset, int]:
    """The endless whitened, scaled batches, and the steps in an epoch. A UserError while
    reading a batch (a corrupted stage file) is appended to `read_errors`: tf.data itself
    only raises an UnknownError with the traceback in its message. `shares`: see crops."""
    side = cfg.crop_side(images.shape[1])

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
        tf.TensorSpec((None, None, None, 1), tf.float32),
        tf.TensorSpec((None, None, None, 1), tf.float32),
    )
    dataset = (
        tf.data.Dataset.from_generator(epochs, output_signature=spec)
        .map(lambda x, t: whiten_pair(x * scale, t * scale, cfg.whiten))
        .prefetch(2)
    )
    full, rest = divmod(len(rows), cfg.batch_size)
    return dataset, full + (rest >= shares)


# --- step size -----------------------------------------------------------------


def top_curvature(x: tf.Tensor | np.ndarray, kernel_shape: tuple[int, int], seed: int) -> float:
    """Largest eigenvalue of the MSE loss's Hessian in the kernel, on the batch x.

    For the loss mean((k ⋆ x - t)²) the Hessian is 2·PᵀP/M, where the rows of P
    are the M image patches under the kernel, however the layer computes its
    convolution. Up to EXACT_HESSIAN_MAX_TAPS it is built exactly (~0.35 s a
    batch at 11×11). Above, building it costs too much (a 32×32 kernel on 16
    crops of 128² is 160 GFLOP), and the value comes from its Toeplitz
    approximation: see _toeplitz_top_curvature.
    """
    x = np.asarray(x, dtype=np.float32)[..., 0]
    if kernel_shape[0] * kernel_shape[1] <= EXACT_HESSIAN_MAX_TAPS:
        hessian = np.zeros((kernel_shape[0] * kernel_shape[1],) * 2)
        count = 0
        for image in x:
            patches = np.lib.stride_tricks.sliding_window_view(image, kernel_shape)
            patches = patches.reshape(-1, hessian.shape[0]).astype(np.float64)
            hessian += patches.T @ patches
            count += len(patches)
        return float(np.linalg.eigvalsh(2.0 * hessian / count)[-1])
    return _toeplitz_top_curvature(x, kernel_shape, seed)


def _toeplitz_top_curvature(x: np.ndarray, kernel_shape: tuple[int, int], seed: int) -> float:
    """The Hessian's top eigenvalue, from below, in two FFTs and a small eigenproblem.

    Entry (a, b) of PᵀP/M is the mean of x[p+a]·x[p+b] over the patches p, close
    to the images' autocorrelation r at lag b−a: a Toeplitz matrix, whose product
    with a kernel is a small correlation with r. Lanczos (eigsh) finds its top
    eigenvector v; the exact Hessian's Rayleigh quotient 2·mean((v ⋆ x)²)/‖v‖²
    then gives the value, never above the true one. On whitened 128² crops that
    is 98.5 % of it for 32×32 and 99.9 % for 13×13; 96 % for 16×16 on 64² crops,
    where borders weigh more. The step's margin covers that. It takes ~0.1 s per
    batch; 12 power iterations of the exact Hessian gave ~95 %, in 10 times that.
    """
    n, h, w = x.shape
    kh, kw = kernel_shape
    shape = (h + kh - 1, w + kw - 1)  # long enough that lags below the kernel's don't wrap
    power = np.sum(np.abs(fft.rfft2(x, s=shape, workers=-1)) ** 2, axis=0, dtype=np.float64)
    autocorrelation = fft.irfft2(power, s=shape, workers=-1)
    dy, dx = np.arange(1 - kh, kh), np.arange(1 - kw, kw)
    overlaps = n * np.outer(h - np.abs(dy), w - np.abs(dx))
    r = autocorrelation[np.ix_(dy % shape[0], dx % shape[1])] / overlaps  # mean x[q]·x[q+d]
    if not np.any(r):
        return 0.0  # all-zero crops; ARPACK refuses a zero operator

    def toeplitz_times(v: np.ndarray) -> np.ndarray:  # (Tv)[a] = Σ_b r[b−a]·v[b]
        return signal.correlate(r, v.reshape(kh, kw), mode="valid")[::-1, ::-1].ravel()

    taps = kh * kw
    operator = LinearOperator((taps, taps), matvec=toeplitz_times, dtype=np.float64)
    start = streams.rng(seed, streams.CURVATURE).standard_normal(taps)
    v = eigsh(operator, k=1, which="LA", v0=start, tol=1e-6)[1][:, 0].reshape(kh, kw)
    outputs = signal.fftconvolve(
        x.astype(np.float64), v[None, ::-1, ::-1], mode="valid", axes=(1, 2)
    )
    return float(2.0 * np.mean(outputs**2) / np.sum(v**2))


# --- devices -------------------------------------------------------------------


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


# --- the fit -------------------------------------------------------------------


def kernel_errors(learned: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(mean squared difference, ‖w−k‖²/‖k‖²)."""
    diff = np.sum((learned - true) ** 2)
    return float(diff / true.size), float(diff / np.sum(true**2))


def residual_moments(
    model: keras.Model,
    images: np.ndarray,
    targets: np.ndarray,
    rows: np.ndarray,
    batch_size: int = 16,
) -> tuple[float, float]:
    """Mean and mean square of target − prediction over whole images, un-whitened, in the
    filter's padding: the bias's least-squares value, and the validation loss."""
    if len(rows) == 0:
        raise ValueError("residual_moments needs at least one row")
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        idx = np.sort(rows[start : start + batch_size])
        x = np.asarray(images[idx], dtype=np.float32)[..., None]
        t = np.asarray(targets[idx], dtype=np.float64)
        residual = t - model(x, training=False).numpy()[..., 0].astype(np.float64)
        total += float(np.sum(residual))
        total_sq += float(np.sum(residual**2))
        count += t.size
    return total / count, total_sq / count


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: stop on divergence, fit the bias, and add val_loss, kernel_mse,
    kernel_rel_error and elapsed_s to the epoch's logs, where later callbacks and Keras's
    History find them."""

    def __init__(self, final_model, true_kernel, images, targets, bias_rows, val_rows, cfg):
        super().__init__()
        self.final_model = final_model
        self.true_kernel = true_kernel
        self.images, self.targets = images, targets
        self.bias_rows, self.val_rows = bias_rows, val_rows
        self.cfg = cfg
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        loss = float(logs["loss"])
        kernel = self.model.get_layer("conv").get_weights()[0]
        if not math.isfinite(loss) or not np.all(np.isfinite(kernel)):
            self.model.stop_training = True
            raise UserError(
                f"training diverged: the loss became {loss} in epoch {epoch + 1}; "
                f"lower train.learning_rate (now {self.cfg.learning_rate:g})"
            )
        layer = self.final_model.get_layer("conv")
        layer.set_weights([kernel, np.zeros(1, np.float32)])
        bias, _ = residual_moments(self.final_model, self.images, self.targets, self.bias_rows)
        layer.set_weights([kernel, np.array([bias], np.float32)])
        if len(self.val_rows):  # with no held-out images val_loss is absent, as in Keras
            _, logs["val_loss"] = residual_moments(
                self.final_model, self.images, self.targets, self.val_rows
            )
        kernel_mse, kernel_rel_error = kernel_errors(
            kernel[:, :, 0, 0].astype(np.float64), self.true_kernel
        )
        logs.update(
            kernel_mse=kernel_mse,
            kernel_rel_error=kernel_rel_error,
            elapsed_s=time.perf_counter() - self.started,
        )
        shown = ("loss", "val_loss", "kernel_rel_error")
        log.info(
            "epoch %d/%d  %s  %.1f s",
            epoch + 1,
            self.cfg.epochs,
            "  ".join(f"{key} {float(logs[key]):.3e}" for key in shown if key in logs),
            logs["elapsed_s"],
        )


class KernelSnapshots(keras.callbacks.Callback):
    """The learned kernel after every epoch, as float64 (epochs, kh, kw)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[np.ndarray] = []

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(learned_kernel(self.model))

    @property
    def stacked(self) -> np.ndarray:
        return np.stack(self.kernels)


def optimizer(cfg: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    rate = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, total_steps, alpha=0.01)
    if cfg.optimizer == "sgd":
        # momentum 0.5, not 0.9: batches differ in curvature, and heavy momentum carries
        # one batch's step into the next (in a sweep, smiley reached 7e-9 in one epoch of
        # 480 images with 0.5 and 6e-4 with 0.9)
        return keras.optimizers.SGD(rate, momentum=0.5, nesterov=True)
    return keras.optimizers.Adam(rate)


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
    """Fit the one-layer model. Returns it in the filter's padding, with its fitted bias,
    ready to predict, and Keras's History of the per-epoch logs (loss, val_loss
    when any image is held out, kernel_mse, kernel_rel_error, elapsed_s).

    `images` (N, S, S) and `targets` are arrays or stacks; `split` holds 'train' or
    'val' per row. `callbacks` run after EpochEnd, so their logs hold its metrics.
    """
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
    curvature = max(top_curvature(WHITENERS[cfg.whiten](x), kernel_shape, seed) for x in batches)
    if not curvature > 0:
        raise UserError(
            "the training images have no contrast to learn from: the first "
            f"{sum(map(len, batches))} training crops are all zero after whitening "
            f"(train.whiten={cfg.whiten}), as flat single-colour photos are; "
            "use photos with edges and texture in data.source"
        )
    scale = 1.0 / math.sqrt(curvature)
    read_errors: list[UserError] = []
    dataset, steps = training_dataset(
        images, targets, train_rows, kernel_shape, padding, cfg, seed, scale, read_errors, shares
    )
    log.info(
        "conv %s, whiten %s, %d train / %d val images, %d steps per epoch, "
        "data scaled by %.3g for unit curvature",
        conv,
        cfg.whiten,
        len(train_rows),
        len(val_rows),
        steps,
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
        model.compile(optimizer=optimizer(cfg, steps * cfg.epochs), loss="mse")
    final = build_model(kernel_shape, conv, padding)
    on_epoch = EpochEnd(
        final, true_kernel, images, targets, train_rows[:BIAS_IMAGES], val_rows, cfg
    )
    try:
        history = model.fit(
            dataset,
            epochs=cfg.epochs,
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
