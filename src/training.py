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

from src import kernels, streams
from src.config import TrainConfig
from src.errors import UserError
from src.layers import build_model, choose_conv, learned_kernel
from src.padding import target_offset

log = logging.getLogger("train")

VAL_MAX_IMAGES = 128  # per-epoch val_loss uses at most this many held-out images
BIAS_IMAGES = 16  # training images the bias is fitted on after each epoch
PROBE_BATCHES = 4  # the step is sized for the steepest of the first few batches
CHECK_IMAGES = 16  # whole training images the stopping rule measures on
PRECONDITION_IMAGES = 64  # whole training images the K-FAC estimate is made on
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
) -> tf.data.Dataset:
    """The endless whitened, scaled batches. A UserError while
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
    return dataset


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
        hessian, _ = exact_normal_equations(x, np.zeros((len(x), 1, 1)), kernel_shape)
        return float(np.linalg.eigvalsh(hessian)[-1])
    return _toeplitz_top_curvature(x, kernel_shape, seed)


def patch_autocorrelation(
    x: np.ndarray, kernel_shape: tuple[int, int], biased: bool = False
) -> np.ndarray:
    """r[d] = mean of x[q]·x[q+d] over the positions q where both lie in a crop, for
    the lags d of a kernel_shape window: (2kh−1, 2kw−1), lag 0 in the middle. x is
    (N, H, W). Two FFTs, however large the kernel. `biased`: the sums over the lag's
    overlap are all divided by the crops' area instead; long lags come out smaller,
    but the Toeplitz matrix of r is then positive semi-definite, as a Hessian is."""
    n, h, w = x.shape
    kh, kw = kernel_shape
    shape = (h + kh - 1, w + kw - 1)  # long enough that lags below the kernel's don't wrap
    power = np.sum(np.abs(fft.rfft2(x, s=shape, workers=-1)) ** 2, axis=0, dtype=np.float64)
    autocorrelation = fft.irfft2(power, s=shape, workers=-1)
    dy, dx = np.arange(1 - kh, kh), np.arange(1 - kw, kw)
    overlaps = n * h * w if biased else n * np.outer(h - np.abs(dy), w - np.abs(dx))
    return autocorrelation[np.ix_(dy % shape[0], dx % shape[1])] / overlaps


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
    kh, kw = kernel_shape
    r = patch_autocorrelation(x, kernel_shape)
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


# --- preconditioning ------------------------------------------------------------


def exact_normal_equations(
    x: np.ndarray, t: np.ndarray, kernel_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(H, b) of the loss mean((k ⋆ x − t)²) = kᵀHk/2 − bᵀk + c on crops x (N, H, W) and
    their 'valid' targets t: H = 2·PᵀP/M and b = 2·Pᵀt/M, built from the patches P
    themselves. For small kernels (EXACT_HESSIAN_MAX_TAPS); a zero t gives H alone."""
    taps = kernel_shape[0] * kernel_shape[1]
    hessian, right, count = np.zeros((taps, taps)), np.zeros(taps), 0
    for image, target in zip(np.asarray(x, np.float64), np.asarray(t, np.float64)):
        patches = np.lib.stride_tricks.sliding_window_view(image, kernel_shape)
        patches = patches.reshape(-1, taps)
        hessian += patches.T @ patches
        if target.size > 1:
            right += patches.T @ target.ravel()
        count += len(patches)
    return 2.0 * hessian / count, 2.0 * right / count


def patch_products(x: np.ndarray, kernel_shape: tuple[int, int]) -> Callable:
    """v ↦ H v, the exact Hessian of the loss on crops x (N, H, W) times a flattened
    kernel v, in two FFT correlations: H = 2·PᵀP/M, P the patches under the kernel."""
    x = np.asarray(x, dtype=np.float32)  # an estimate of a few %: single-precision FFTs do
    outputs = (x.shape[1] - kernel_shape[0] + 1) * (x.shape[2] - kernel_shape[1] + 1) * len(x)

    def times(v: np.ndarray) -> np.ndarray:
        k = v.reshape(kernel_shape).astype(np.float32)
        with fft.set_workers(-1):  # fftconvolve's FFTs on every core
            out = signal.fftconvolve(x, k[None, ::-1, ::-1], mode="valid", axes=(1, 2))
            back = signal.fftconvolve(x, out[:, ::-1, ::-1], mode="valid", axes=(1, 2))
        return 2.0 * back.sum(axis=0, dtype=np.float64).ravel() / outputs

    return times


class Preconditioner:
    """The inverse of the loss's Hessian in the kernel, estimated on crops x (N, H, W):
    `inverse` (taps, taps), row-major taps as the Conv2D kernel flattens them.

    The Hessian of mean((k ⋆ x − t)²) is 2·PᵀP/M, the input-patch covariance,
    whatever the target: for one conv layer this is what K-FAC preconditions with.
    Its Toeplitz approximation (entry (a, b) = r[b − a]) costs two FFTs at any
    kernel size. A whitened photo's spectrum is not flat, so plain gradient descent
    still sees a spread of curvatures; times this inverse, every direction has
    curvature about 1 and a step of 1 is Newton's.
    """

    def __init__(self, x: np.ndarray, kernel_shape: tuple[int, int]):
        kh, kw = kernel_shape
        r = patch_autocorrelation(np.asarray(x, dtype=np.float64), kernel_shape, biased=True)
        rows, cols = np.indices((kh, kw)).reshape(2, -1)
        lag_y = rows[None, :] - rows[:, None] + kh - 1
        lag_x = cols[None, :] - cols[:, None] + kw - 1
        values, vectors = np.linalg.eigh(2.0 * r[lag_y, lag_x])
        if not values[-1] > 0:
            raise ValueError("the crops have no contrast")
        # a floor under the eigenvalues: directions the crops hardly excite (flat photos,
        # no whitening) get a damped step instead of an unbounded one
        values = np.maximum(values, values[-1] * 1e-6)
        self.inverse = (vectors / values) @ vectors.T
        self._inverse_sqrt = (vectors / np.sqrt(values)) @ vectors.T

    def top_curvature(self, x: np.ndarray, kernel_shape: tuple[int, int], seed: int) -> float:
        """The largest curvature of the preconditioned loss on the batch x: the top
        eigenvalue of H^(-1/2)·H_x·H^(-1/2), by Lanczos on exact products. A step is
        stable on x below 2 over it."""
        root = self._inverse_sqrt
        taps = root.shape[0]
        if taps <= EXACT_HESSIAN_MAX_TAPS:  # the batch's Hessian itself, in one product
            hessian, _ = exact_normal_equations(x, np.zeros((len(x), 1, 1)), kernel_shape)
            return float(np.linalg.eigvalsh(root @ hessian @ root)[-1])
        times = patch_products(x, kernel_shape)
        operator = LinearOperator(
            (taps, taps), matvec=lambda v: root @ times(root @ v), dtype=np.float64
        )
        start = streams.rng(seed, streams.CURVATURE).standard_normal(taps)
        # a few % is enough: the step's margin covers it, and each product is two FFTs
        return float(eigsh(operator, k=1, which="LA", v0=start, tol=1e-2)[0][0])


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


MAX_SNAPSHOTS = 40  # kernel snapshots per run, log-spaced over the optimizer steps
PLATEAU = 0.99  # an epoch whose loss is not below this share of the best so far ...
PLATEAU_FACTOR = 0.5  # ... multiplies the learning rate by this
ANNEALED = 10  # halvings after which a kernel that stopped moving has converged (noisy targets)


def snapshot_steps(max_steps: int, count: int = MAX_SNAPSHOTS) -> set[int]:
    """About `count` optimizer steps from 0 to max_steps, log-spaced (every step of a short
    run), 0 included: where training records the kernel. A run that stops sooner keeps
    the ones it reached, plus its last step."""
    if max_steps <= count:
        return set(range(max_steps + 1))
    spaced = np.round(np.geomspace(1, max_steps, num=count)).astype(int)
    return {0, *spaced.tolist()}


def epoch_steps(train_images: int, cfg: TrainConfig, shares: int = 1) -> int:
    """Optimizer steps in an epoch: one pass over the training images, but at least
    train.min_epoch_steps (a few photos then give several crops each an epoch). A
    last batch smaller than `shares` is not a step (see crops)."""
    full, rest = divmod(train_images, cfg.batch_size)
    return max(full + (rest >= shares), cfg.min_epoch_steps)


class NewtonStep:
    """The stopping rule's measure: how far the kernel still is from the least-squares
    optimum of a fixed set of training images, relative to its norm, ‖H⁻¹∇L‖ / ‖k‖.

    For the quadratic loss of a linear layer the Newton step H⁻¹∇L is exactly the way to
    that optimum, so this is the kernel's remaining relative error on that data. It reads
    only inputs, targets and the weights: never the true kernel. Computed in float64
    with FFTs on the whitened, scaled whole images, as training sees them; it does not
    shrink when the learning rate does, so a slowed run is not taken for a finished one.
    """

    def __init__(self, x: np.ndarray, t: np.ndarray, inverse: np.ndarray):
        self.x, self.t, self.inverse = x, t, inverse
        self.shape = (x.shape[1] - t.shape[1] + 1, x.shape[2] - t.shape[2] + 1)
        self.normal = None
        if self.shape[0] * self.shape[1] <= EXACT_HESSIAN_MAX_TAPS:
            # the loss is quadratic: its gradient Hk − b, from (H, b) built once
            self.normal = exact_normal_equations(x, t, self.shape)

    def __call__(self, kernel: np.ndarray) -> float:
        k = np.asarray(kernel, dtype=np.float64).reshape(self.shape)
        if self.normal is not None:
            hessian, right = self.normal
            step = self.inverse @ (hessian @ k.ravel() - right)
            return float(np.linalg.norm(step) / max(np.linalg.norm(k), 1e-30))
        with fft.set_workers(-1):  # fftconvolve's FFTs on every core
            prediction = signal.fftconvolve(self.x, k[None, ::-1, ::-1], mode="valid", axes=(1, 2))
            residual = prediction - self.t
            gradient = signal.fftconvolve(
                self.x, residual[:, ::-1, ::-1], mode="valid", axes=(1, 2)
            )
        gradient = 2.0 * gradient.sum(axis=0) / residual.size
        step = self.inverse @ gradient.ravel()
        return float(np.linalg.norm(step) / max(np.linalg.norm(k), 1e-30))


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: stop on divergence, fit the bias, and add val_loss, kernel_mse,
    kernel_rel_error, kernel_change, newton_step, learning_rate, steps, converged and
    elapsed_s to the
    epoch's logs, where later callbacks and Keras's History find them.

    The stopping rule reads only what training itself sees: the run has converged when
    the Newton step (NewtonStep) is below train.tolerance. In the fast recipe an epoch
    whose loss is not 1 % below the best so far halves the learning rate, so noisy
    targets (filter.noise_std) settle too; with noise the check images' own optimum is
    off by the noise, and the run has converged once the rate has been halved ANNEALED
    times and an epoch moved the kernel by less than train.tolerance. The true kernel
    is only measured.
    """

    def __init__(
        self, final_model, true_kernel, images, targets, bias_rows, val_rows, cfg, newton_step
    ):
        super().__init__()
        self.newton_step = newton_step
        self.final_model = final_model
        self.true_kernel = true_kernel
        self.images, self.targets = images, targets
        self.bias_rows, self.val_rows = bias_rows, val_rows
        self.cfg = cfg
        self.started = time.perf_counter()
        self.steps = 0
        self.converged = False

    def on_train_begin(self, logs=None):
        self.previous = self.model.get_layer("conv").get_weights()[0].astype(np.float64)
        self.best_loss = math.inf

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps >= self.cfg.max_steps:
            self.model.stop_training = True

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
        kernel64 = kernel.astype(np.float64)
        change = float(
            np.linalg.norm(kernel64 - self.previous) / max(np.linalg.norm(kernel64), 1e-30)
        )
        self.previous = kernel64
        remaining = self.newton_step(kernel64)
        rate = self.model.optimizer.learning_rate
        annealed = float(rate.numpy()) <= self.cfg.learning_rate * PLATEAU_FACTOR**ANNEALED
        self.converged = remaining < self.cfg.tolerance or (
            annealed and change < self.cfg.tolerance
        )
        logs.update(learning_rate=float(rate.numpy()))
        if loss < PLATEAU * self.best_loss:
            self.best_loss = loss
        elif self.cfg.recipe == "fast":  # the original kept its rate
            rate.assign(rate * PLATEAU_FACTOR)
        if self.converged:
            self.model.stop_training = True
        kernel_mse, kernel_rel_error = kernels.errors(kernel64[:, :, 0, 0], self.true_kernel)
        logs.update(
            kernel_mse=kernel_mse,
            kernel_rel_error=kernel_rel_error,
            kernel_change=change,
            newton_step=remaining,
            steps=self.steps,
            converged=float(self.converged),
            elapsed_s=time.perf_counter() - self.started,
        )
        shown = ("loss", "val_loss", "newton_step", "kernel_rel_error")
        log.info(
            "epoch %d, step %d/%d  %s  %.1f s",
            epoch + 1,
            self.steps,
            self.cfg.max_steps,
            "  ".join(f"{key} {float(logs[key]):.3e}" for key in shown if key in logs),
            logs["elapsed_s"],
        )


class KernelSnapshots(keras.callbacks.Callback):
    """The learned kernel at log-spaced optimizer steps (snapshot_steps), from step 0, the
    random initial weights, to the last step: `kernels` float64 (n, kh, kw), `steps` and
    `epochs` (the 1-based epoch each step ends; 0 for step 0). `taken()` hands a logger
    the snapshots since its last call."""

    def __init__(self, max_steps: int):
        super().__init__()
        self.planned = snapshot_steps(max_steps)
        self.kernels: list[np.ndarray] = []
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self._step, self._epoch, self._handed = 0, 0, 0

    def _take(self) -> None:
        if not self.steps or self.steps[-1] != self._step:
            self.kernels.append(learned_kernel(self.model))
            self.steps.append(self._step)
            self.epochs.append(self._epoch + (self._step > 0))

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step in self.planned:
            self._take()

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:  # the last step, wherever it falls
            self._take()

    def on_train_end(self, logs=None):
        self._take()

    def taken(self) -> list[tuple[int, int, np.ndarray]]:
        new = list(zip(self.steps, self.epochs, self.kernels))[self._handed :]
        self._handed = len(self.steps)
        return new

    @property
    def stacked(self) -> np.ndarray:
        return np.stack(self.kernels)


def _check_images(images, targets, train_rows, kernel_shape, padding, cfg, scale):
    """The stopping rule's images, whole, whitened and scaled as training sees them:
    float64 (x, t) for NewtonStep."""
    rows = np.sort(train_rows[:CHECK_IMAGES])
    side = images.shape[1]
    x, t = next(
        crops(
            images,
            targets,
            rows,
            kernel_shape,
            padding,
            len(rows),
            side,
            streams.rng(0, streams.CROPS),
        )
    )
    xw, tw = whiten_pair(x * scale, t * scale, cfg.whiten)
    return np.asarray(xw, np.float64)[..., 0], np.asarray(tw, np.float64)[..., 0]


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
        *_check_images(images, targets, train_rows, kernel_shape, padding, cfg, scale),
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
