"""The callbacks of the fit: what happens after each epoch (the stopping rule, the bias,
the metrics), and the kernel snapshots at log-spaced optimizer steps."""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np

from src import kernels
from src.errors import UserError
from src.layers import learned_kernel

log = logging.getLogger("train")

MAX_SNAPSHOTS = 40  # kernel snapshots per run, log-spaced over the optimizer steps
PLATEAU = 0.99  # an epoch whose loss is not below this share of the best so far ...
PLATEAU_FACTOR = 0.5  # ... multiplies the learning rate by this
ANNEALED = 10  # halvings after which a kernel that stopped moving has converged (noisy targets)


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


def snapshot_steps(max_steps: int, count: int = MAX_SNAPSHOTS) -> set[int]:
    """About `count` optimizer steps from 0 to max_steps, log-spaced (every step of a short
    run), 0 included: where training records the kernel. A run that stops sooner keeps
    the ones it reached, plus its last step."""
    if max_steps <= count:
        return set(range(max_steps + 1))
    spaced = np.round(np.geomspace(1, max_steps, num=count)).astype(int)
    return {0, *spaced.tolist()}


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
