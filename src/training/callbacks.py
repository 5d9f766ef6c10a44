"""The callbacks of the fit: what happens after each epoch (the stopping rule, the bias,
the metrics), and the kernel snapshots at log-spaced optimizer steps."""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np

from src.errors import UserError
from src.layers import learned_bias, learned_kernel

log = logging.getLogger("train")

MAX_SNAPSHOTS = 40  # kernel snapshots per run, log-spaced over the optimizer steps
FLOOR = 3.0  # a Newton step within this many of its standard errors is at the noise floor
STALL = 2.0  # ... or that has fallen less than this factor in an epoch ...
STALL_STEPS = 8  # ... of at least this many optimizer steps ...
SE_MIN = 1e-8  # a standard error below this is rounding: exact targets, no noise floor
STALL_MAX = 0.05  # ... either only below this (relative): far from the optimum it is not noise
BATCH = 16  # whole images predicted at once


def kernel_errors(learned: np.ndarray, true: np.ndarray, names: list[str]) -> dict[str, float]:
    """kernel_mse, kernel_rel_error (‖w − k‖² / ‖k‖², over the whole bank) and, for a bank,
    kernel_rel_error/<name> of each filter."""
    difference = learned - true
    errors = {
        "kernel_mse": float(np.mean(difference**2)),
        "kernel_rel_error": float(np.sum(difference**2) / max(np.sum(true**2), 1e-300)),
    }
    if len(names) > 1:
        for f, name in enumerate(names):
            errors[f"kernel_rel_error/{name}"] = float(
                np.sum(difference[..., f] ** 2) / max(np.sum(true[..., f] ** 2), 1e-300)
            )
    return errors


def residual_moments(model, images, targets, rows, batch_size: int = BATCH):
    """Per filter: the mean and mean square of target − prediction over the rows' whole
    images, as they are, in the filter's padding; and the targets' variance. The bias's
    least-squares value, and the loss on the same footing for training and held-out
    images."""
    if len(rows) == 0:
        raise ValueError("residual_moments needs at least one row")
    total = total_sq = t_sum = t_sq = 0.0
    count = 0
    for start in range(0, len(rows), batch_size):
        idx = np.sort(rows[start : start + batch_size])
        x = np.asarray(images[idx], dtype=np.float32)
        x = x[..., None] if x.ndim == 3 else x
        t = np.asarray(targets[idx], dtype=np.float64)
        t = t[..., None] if t.ndim == 3 else t
        residual = t - model(x, training=False).numpy().astype(np.float64)
        total = total + residual.sum(axis=(0, 1, 2))
        total_sq = total_sq + (residual**2).sum(axis=(0, 1, 2))
        t_sum = t_sum + t.sum(axis=(0, 1, 2))
        t_sq = t_sq + (t**2).sum(axis=(0, 1, 2))
        count += t[..., 0].size
    variance = float(np.sum(t_sq / count - (t_sum / count) ** 2))
    return total / count, total_sq / count, variance


def snapshot_steps(max_steps: int, count: int = MAX_SNAPSHOTS) -> set[int]:
    """About `count` optimizer steps from 0 to max_steps, log-spaced (every step of a short
    run), 0 included: where training records the kernel. A run that stops sooner keeps
    the ones it reached, plus its last step."""
    if max_steps <= count:
        return set(range(max_steps + 1))
    spaced = np.round(np.geomspace(1, max_steps, num=count)).astype(int)
    return {0, *spaced.tolist()}


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: stop on divergence, fit the bias (a linear layer trains in
    whitened space, where there is none), measure, and apply the stopping rule.

    The epoch's logs get `crop_loss` (the training batches' loss, as Keras measured it),
    `loss` and `val_loss` (mean squared error on whole training and held-out images, as
    they are: the same footing), `explained_variance` (R² on the held-out images, or the
    training ones with none held out), the kernel errors when a true kernel exists,
    `newton_step`, `standard_error`, `kernel_change`, `steps`, `elapsed_s`.

    The stopping rule reads only what training itself sees (stopping.NewtonStep): the
    run has reached the optimum when every filter's Newton step is below
    train.tolerance, and the noise floor when the standard error is above
    train.tolerance / FLOOR (the targets' noise, or a filter no linear layer is, is then
    measurable) and every step is within FLOOR standard errors, or has fallen less than
    STALL× in the epoch while below STALL_MAX. `stop_reason` says which. The true kernel
    is only measured.
    """

    def __init__(
        self,
        final_model,
        true_kernel,
        names,
        images,
        targets,
        bias_rows,
        val_rows,
        cfg,
        newton_step,
        linear: bool,
        floor_rule: bool,
    ):
        super().__init__()
        self.newton_step = newton_step
        self.final_model = final_model
        self.true_kernel, self.names = true_kernel, names
        self.images, self.targets = images, targets
        self.bias_rows, self.val_rows = bias_rows, val_rows
        self.cfg, self.linear, self.floor_rule = cfg, linear, floor_rule
        self.started = time.perf_counter()
        self.steps = 0
        self.stop_reason: str | None = None
        self.measured: list[tuple[int, np.ndarray]] = []  # (steps, Newton steps) an epoch
        self.last: dict = {}

    def on_train_begin(self, logs=None):
        self.previous = learned_kernel(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps >= self.cfg.max_steps:
            self.model.stop_training = True
            self.stop_reason = self.stop_reason or "max_steps"

    def measure(self, logs: dict) -> None:
        """loss, val_loss, explained_variance and the kernel errors of the final model."""
        _, mean_sq, variance = residual_moments(
            self.final_model, self.images, self.targets, self.bias_rows
        )
        logs["loss"] = float(np.mean(mean_sq))
        if len(self.val_rows):  # with no held-out images val_loss is absent, as in Keras
            _, val_sq, variance = residual_moments(
                self.final_model, self.images, self.targets, self.val_rows
            )
            logs["val_loss"] = float(np.mean(val_sq))
        shown = logs.get("val_loss", logs["loss"])
        filters = len(self.names)
        logs["explained_variance"] = (
            1.0 - shown * filters / variance if variance > 0 else float("nan")
        )
        if self.true_kernel is not None:
            logs.update(
                kernel_errors(learned_kernel(self.final_model), self.true_kernel, self.names)
            )

    def on_epoch_end(self, epoch, logs=None):
        crop_loss = float(logs["loss"])
        kernel = self.model.get_layer("conv").get_weights()[0]
        if not math.isfinite(crop_loss) or not np.all(np.isfinite(kernel)):
            self.model.stop_training = True
            raise UserError(
                f"training diverged: the loss became {crop_loss} in epoch {epoch + 1}; "
                f"lower train.learning_rate (now {self.cfg.learning_rate:g})"
            )
        filters = kernel.shape[-1]
        layer = self.final_model.get_layer("conv")
        if self.linear:
            layer.set_weights([kernel, np.zeros(filters, np.float32)])
            bias, _, _ = residual_moments(
                self.final_model, self.images, self.targets, self.bias_rows
            )
        else:
            bias = learned_bias(self.model)
        layer.set_weights([kernel, np.asarray(bias, np.float32)])
        logs["crop_loss"] = crop_loss
        self.measure(logs)
        kernel64 = kernel.astype(np.float64)
        change = float(
            np.linalg.norm(kernel64 - self.previous) / max(np.linalg.norm(kernel64), 1e-30)
        )
        self.previous = kernel64
        step, error = self.newton_step(kernel64, np.asarray(bias, np.float64))
        tolerance = self.cfg.tolerance
        if np.all(step < tolerance):
            self.stop_reason = "optimum"
        elif self.floor_rule and np.max(error) > SE_MIN:
            # the targets' noise (or a filter no linear layer is) is measurable. At its floor
            # the step is within FLOOR standard errors (when the standard error is above a
            # third of the tolerance), or has stopped falling: less than STALL× over at least
            # STALL_STEPS optimizer steps (an epoch of a few photos is one) while small
            earlier = [v for steps, v in self.measured if self.steps - steps >= STALL_STEPS]
            stalled = bool(earlier) and np.all(step > earlier[-1] / STALL)
            within = np.max(error) > tolerance / FLOOR and np.all(step <= FLOOR * error)
            # far from the optimum (a step above STALL_MAX) the halves' K-FAC steps differ by
            # more than their noise; with each half's exact equations the standard error is
            # exact and needs no such guard (|Sobel x|'s best kernel is near zero, and every
            # relative step large)
            small = self.newton_step.normal is not None or np.max(step) < STALL_MAX
            if small and (within or stalled):
                self.stop_reason = "noise floor"
        self.measured.append((self.steps, step))
        if self.stop_reason in ("optimum", "noise floor"):
            self.model.stop_training = True
        logs.update(
            newton_step=float(np.max(step)),
            standard_error=float(np.max(error)),
            kernel_change=change,
            steps=self.steps,
            elapsed_s=time.perf_counter() - self.started,
        )
        self.last = dict(logs)
        shown = ("loss", "val_loss", "explained_variance", "newton_step", "standard_error")
        shown += ("kernel_rel_error",)
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
    random initial weights, to the last step: `kernels` float64 (n, kh, kw, C, F), `steps`
    and `epochs` (the 1-based epoch each step ends; 0 for step 0). `taken()` hands a
    logger the snapshots since its last call; `add` records one made after training (the
    final exact step)."""

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

    def add(self, step: int, epoch: int, kernel: np.ndarray) -> None:
        if self.steps and self.steps[-1] == step:
            self.kernels[-1] = np.asarray(kernel, np.float64)
        else:
            self.kernels.append(np.asarray(kernel, np.float64))
            self.steps.append(step)
            self.epochs.append(epoch)

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
