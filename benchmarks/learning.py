"""Three ways to the kernel on the same (grayscale, target) pairs, each timed from its start.

ours          src.training.train with the TrainConfig of params.yaml (or any TrainConfig,
              e.g. train.recipe original), unchanged; a callback after its epoch callback
              also records the kernel error between batches.
original      the original project's recipe: Keras Conv2D ('same', one filter, bias), Adam
              at 1e-3, batch size 1, MSE, whole images and 'same' targets, stopped at a
              time budget.
projection    the original recipe again with FFTConv2D in place of Conv2D: the same
              function, gradients, initial weights and image order, only cheaper per step
              for big kernels. Its step count to an error, times the original's measured
              step time, projects the original's time where the budget cuts it short.
closed form   the least-squares kernel from the normal equations over all valid patches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf
from scipy import fft

from src import filtering, layers, streams, training
from src.config import TrainConfig

log = logging.getLogger("bench.learning")

THRESHOLDS = (1e-2, 1e-3, 1e-4)
TRACE_EVERY_S = 0.01  # the error is read between batches at most this often (and on the first)
CHUNK = 32  # images per block in the closed form


# --- the error trace -------------------------------------------------------------


class Trace:
    """(seconds since start, step, ‖w−k‖²/‖k‖², |bias|) read between batches."""

    def __init__(self, true_kernel: np.ndarray):
        self.true_kernel = np.asarray(true_kernel, dtype=np.float64)
        self.start = time.perf_counter()
        self.points: list[tuple[float, int, float, float]] = []
        self.step = 0
        self._last = -math.inf

    def restart(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def after_batch(self, model) -> float | None:
        """Count the step; read the kernel error if TRACE_EVERY_S has passed. Returns it."""
        self.step += 1
        if self.points and time.perf_counter() - self._last < TRACE_EVERY_S:
            return None
        return self.read(model)

    def read(self, model) -> float:
        now = time.perf_counter()
        weights = model.get_layer("conv").get_weights()  # ours trains no bias: it is fitted
        kernel, bias = weights[0], (float(np.ravel(weights[1])[0]) if len(weights) > 1 else 0.0)
        error = relative_error(kernel, self.true_kernel)
        self.points.append((now - self.start, self.step, error, float(abs(bias))))
        self._last = time.perf_counter()
        return error

    def reached(self, threshold: float) -> dict:
        """When the error first fell to `threshold`, and from when it stayed there."""
        first = next((p for p in self.points if p[2] <= threshold), None)
        above = [i for i, p in enumerate(self.points) if p[2] > threshold]
        settled = None
        if first is not None and (not above or above[-1] + 1 < len(self.points)):
            settled = self.points[above[-1] + 1 if above else 0]
        return {
            "threshold": threshold,
            "first_s": None if first is None else round(first[0], 3),
            "first_step": None if first is None else first[1],
            "settled_s": None if settled is None else round(settled[0], 3),
            "settled_step": None if settled is None else settled[1],
        }

    def summary(self, every: int = 0, thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
        errors = [p[2] for p in self.points]
        first_1e2 = next((i for i, e in enumerate(errors) if e <= THRESHOLDS[0]), None)
        return {
            "reached": [self.reached(e) for e in thresholds],
            "steps": self.step,
            "final_error": errors[-1] if errors else None,
            "min_error": min(errors) if errors else None,
            # a rise after the error first reached 1e-2 means the step went unstable
            "max_error_after_1e-2": max(errors[first_1e2:]) if first_1e2 is not None else None,
            "max_abs_bias": max(p[3] for p in self.points) if self.points else None,
            "trace": [[round(t, 3), s, e] for t, s, e, _ in self.points[:: every or 1]],
        }


def relative_error(learned: np.ndarray, true_kernel: np.ndarray) -> float:
    """‖w−k‖²/‖k‖² over the whole kernel, whether either is (kh, kw) or (kh, kw, C, F)."""
    k = np.asarray(true_kernel, np.float64)
    w = np.asarray(learned, np.float64).reshape(k.shape)
    return float(np.sum((w - k) ** 2) / np.sum(k**2))


def plane(kernel: np.ndarray) -> np.ndarray:
    """A gray single-filter kernel as (kh, kw), from (kh, kw) or (kh, kw, 1, 1)."""
    kernel = np.asarray(kernel)
    return kernel.reshape(kernel.shape[:2]) if kernel.size == np.prod(kernel.shape[:2]) else kernel


def gray(images: np.ndarray) -> np.ndarray:
    """Gray images as (N, H, W), from (N, H, W) or (N, H, W, 1)."""
    images = np.asarray(images)
    return images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images


def train(images, targets, true_kernel, split, padding, cfg, seed, callbacks=()):
    """src.training.train as the train stage calls it (4-D kernels, the closed form not
    asked for): (its Result, the last epoch's logs)."""
    true = np.asarray(true_kernel, np.float64)
    true = true[:, :, None, None] if true.ndim == 2 else true
    result = training.train(
        images,
        targets,
        true,
        split,
        padding,
        cfg,
        seed,
        kernel_shape=true.shape[:2],
        callbacks=callbacks,
    )
    last = dict(result.history[-1]) if result.history else {}
    last.update(converged=result.converged, steps=result.steps, stop_reason=result.stop_reason)
    return result, last


def _thin(points: list, keep: int = 400) -> int:
    return max(1, len(points) // keep)


# --- ours ------------------------------------------------------------------------


def ours(
    images: np.ndarray,
    targets: np.ndarray,
    true_kernel: np.ndarray,
    split: np.ndarray,
    padding: str,
    cfg: TrainConfig,
    seed: int,
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> dict:
    """src.training.train as the train stage calls it, with the error read between batches:
    when it reached each of `thresholds`, and what the last epoch's logs say (converged,
    the trainer's own step count, the Newton step)."""
    trace = Trace(true_kernel)
    epochs: list[dict] = []
    fit_end: list[float] = []

    class Traced(keras.callbacks.Callback):
        """Reads the error between batches; runs after training's EpochEnd, so its logs
        hold the epoch's kernel_rel_error."""

        def on_train_batch_end(self, batch, logs=None):
            trace.after_batch(self.model)

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(
                {
                    "epoch": epoch + 1,
                    "seconds": round(trace.elapsed, 3),
                    "kernel_rel_error": logs["kernel_rel_error"],
                    "loss": logs["loss"],
                }
            )

        def on_train_end(self, logs=None):
            fit_end.append(trace.elapsed)

    trace.restart()
    fitted, last = train(
        images, targets, true_kernel, split, padding, cfg, seed, callbacks=[Traced()]
    )
    total = trace.elapsed
    final = relative_error(fitted.model.get_layer("conv").get_weights()[0], true_kernel)
    result = trace.summary(_thin(trace.points), thresholds)
    first_step = trace.points[0][0] if trace.points else None
    per_epoch = [
        {
            "threshold": e,
            "seconds": next((r["seconds"] for r in epochs if r["kernel_rel_error"] <= e), None),
        }
        for e in thresholds
    ]
    result.update(
        total_s=round(total, 3),
        final_error=final,
        converged=bool(last["converged"]),
        trainer_steps=int(last["steps"]),
        newton_step=float(last["newton_step"]),
        setup_s=first_step,
        # train() returning well after fit() ends was seen once: kept on record
        after_fit_s=round(total - fit_end[0], 3) if fit_end else None,
        kernel_shape=list(true_kernel.shape),
        epochs=epochs,
        per_epoch_reached=per_epoch,
        config=cfg.effective().model_dump(),  # what it trained with: the recipe applied
    )
    log.info(
        "ours: final error %.2e in %.1f s, %d steps, %s (first step after %.1f s)",
        final,
        total,
        result["trainer_steps"],
        "converged" if result["converged"] else "not converged",
        first_step or float("nan"),
    )
    return result


# --- the original recipe -----------------------------------------------------------


def same_targets(
    images: np.ndarray, rows: np.ndarray, conv_kernel: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """out[i] = images[rows[i]] correlated with the kernel, 'same' padding, as the original."""
    for start in range(0, len(rows), filtering.CHUNK):
        block = rows[start : start + filtering.CHUNK]
        out[start : start + len(block)] = gray(
            filtering.correlate(gray(images[block]), plane(conv_kernel), "same")
        )
    return out


def _one_by_one(
    images: np.ndarray, rows: np.ndarray, targets: np.ndarray, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of one whole image, in a seeded new order every epoch (Keras' shuffle)."""
    rng = streams.rng(seed, streams.ORIGINAL_ORDER)
    while True:
        for i in rng.permutation(len(rows)):
            yield (
                gray(np.asarray(images[rows[i : i + 1]], np.float32))[..., None],
                gray(np.asarray(targets[i : i + 1], np.float32))[..., None],
            )


def original(
    images: np.ndarray,
    rows: np.ndarray,
    targets: np.ndarray,
    true_kernel: np.ndarray,
    budget_s: float,
    seed: int,
    conv: str = "direct",
    initial: list[np.ndarray] | None = None,
) -> dict:
    """Train the original's model until `budget_s` or the smallest threshold is reached.

    `targets[i]` is the 'same' target of image rows[i]. With conv='fft' and the
    original's `initial` weights this is the projection run.
    """
    keras.utils.set_random_seed(seed)
    trace = Trace(true_kernel)
    shape = tuple(plane(true_kernel).shape)
    size = images.shape[1]
    layer = (
        keras.layers.Conv2D(1, shape, padding="same", name="conv")
        if conv == "direct"
        else layers.FFTConv2D(shape, padding="same", name="conv")
    )
    model = keras.Sequential([keras.Input((size, size, 1)), layer])
    if initial is not None:
        layer.set_weights(initial)
    start_weights = [w.copy() for w in layer.get_weights()]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    spec = (tf.TensorSpec((1, size, size, 1), tf.float32),) * 2
    dataset = tf.data.Dataset.from_generator(
        lambda: _one_by_one(images, rows, targets, seed), output_signature=spec
    ).prefetch(4)
    stop_at = min(THRESHOLDS)

    class Budget(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            error = trace.after_batch(self.model)
            if error is not None and error <= stop_at or trace.elapsed >= budget_s:
                if error is None:
                    trace.read(self.model)
                self.model.stop_training = True

    model.fit(dataset, epochs=10**6, steps_per_epoch=len(rows), verbose=0, callbacks=[Budget()])
    total = trace.elapsed
    result = trace.summary(_thin(trace.points))
    stopped = (
        "threshold"
        if result["final_error"] is not None and result["final_error"] <= stop_at
        else "budget"
    )
    result.update(
        total_s=round(total, 3),
        conv=conv,
        budget_s=budget_s,
        stopped_by=stopped,
        images_seen=trace.step,
        epochs_seen=round(trace.step / len(rows), 3),
        setup_s=trace.points[0][0] if trace.points else None,
        step_s=_step_time(trace.points),
    )
    log.info(
        "original (%s): error %.2e after %d steps in %.1f s (stopped by %s)",
        conv,
        result["final_error"],
        trace.step,
        total,
        stopped,
    )
    result["_initial"] = start_weights
    return result


def _step_time(points: list) -> float | None:
    """Seconds per step once running: the slope over the trace after its first tenth."""
    if len(points) < 3:
        return None
    t0, s0 = points[max(1, len(points) // 10)][:2]
    t1, s1 = points[-1][:2]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else None


def project(direct: dict, fft_run: dict) -> dict:
    """The original's time to each threshold: its own setup time plus the projection run's
    steps to it times the original's step time; and how closely the two runs agree on
    the steps both made (the same math, so only float round-off should part them)."""
    step_s, setup_s = direct["step_s"], direct["setup_s"] or 0.0
    reached = []
    for r in fft_run["reached"]:
        steps = r["first_step"]
        reached.append(
            {
                "threshold": r["threshold"],
                "steps": steps,
                "projected_s": None
                if steps is None or step_s is None
                else round(setup_s + steps * step_s, 1),
            }
        )
    a = np.array([(s, e) for _, s, e in direct["trace"]], dtype=np.float64)
    b = np.array([(s, e) for _, s, e in fft_run["trace"]], dtype=np.float64)
    overlap = a[a[:, 0] <= b[-1, 0]] if len(a) and len(b) else a[:0]
    drift = None
    if len(overlap):
        interpolated = np.interp(overlap[:, 0], b[:, 0], np.log10(b[:, 1]))
        drift = float(np.max(np.abs(np.log10(overlap[:, 1]) - interpolated)))
    return {
        "reached": reached,
        "original_step_s": step_s,
        "original_setup_s": setup_s,
        "steps_compared": int(len(overlap)),
        "max_log10_drift": drift,
    }


# --- the closed form -----------------------------------------------------------------


def _whiten(a: np.ndarray) -> np.ndarray:
    # the gradient whitening of src.training, in numpy: the same 'valid' geometry
    return np.concatenate([a[:, 1:, 1:] - a[:, 1:, :-1], a[:, 1:, 1:] - a[:, :-1, 1:]])


def closed_form(
    images: np.ndarray,
    targets: np.ndarray,
    rows: np.ndarray,
    true_kernel: np.ndarray,
    refinements: int = 1,
) -> dict:
    """Least squares over every valid patch of the (whitened) training images.

    Whitening both sides with the same derivative filters keeps the exact solution and
    makes XᵀX well conditioned. Xᵀy is exact: one FFT cross-correlation per image. XᵀX is
    taken as Toeplitz, from each image's autocorrelation weighted by how many patches hold
    each pixel; that ignores only which patches reach the border. Each refinement pass
    then solves that system again for the exact residual Xᵀ(y − Xw), computed with FFTs.
    """
    kh, kw = plane(true_kernel).shape
    size = images.shape[1] - 1
    out_h, out_w = size - kh + 1, size - kw + 1
    n = fft.next_fast_len(size + max(kh, kw) - 1, real=True)
    # pixel q lies in this many of the kernel's patch offsets' windows, / their count
    weight = np.outer(
        np.convolve(np.ones(out_h), np.ones(kh)) / kh, np.convolve(np.ones(out_w), np.ones(kw)) / kw
    ).astype(np.float32)
    start = time.perf_counter()
    auto = np.zeros((n, n))
    cross = np.zeros((kh, kw))
    for block in _blocks(images, targets, rows):
        x, y = block
        spectrum = fft.rfft2(x, s=(n, n), workers=-1)
        weighted = fft.rfft2(weight * x, s=(n, n), workers=-1)
        auto += fft.irfft2(
            np.sum(np.conj(weighted) * spectrum, axis=0).astype(np.complex128), s=(n, n), workers=-1
        )
        target = fft.rfft2(y, s=(n, n), workers=-1)
        cross += fft.irfft2(
            np.sum(np.conj(target) * spectrum, axis=0).astype(np.complex128), s=(n, n), workers=-1
        )[:kh, :kw]
    taps = np.arange(kh * kw)
    ty, tx = taps // kw, taps % kw
    normal = auto[(ty[None, :] - ty[:, None]) % n, (tx[None, :] - tx[:, None]) % n]
    normal = (normal + normal.T) / 2  # the weighting leaves it a little asymmetric
    factor = scipy.linalg.cho_factor(normal)
    kernel = scipy.linalg.cho_solve(factor, cross.ravel()).reshape(kh, kw)
    passes = [_pass(0, start, kernel, true_kernel)]
    for number in range(1, refinements + 1):
        residual = np.zeros((kh, kw))
        k_spectrum = np.conj(fft.rfft2(kernel.astype(np.float32), s=(size, size)))
        for x, y in _blocks(images, targets, rows):
            spectrum = fft.rfft2(x, workers=-1)
            prediction = fft.irfft2(spectrum * k_spectrum, s=(size, size), workers=-1)
            error = fft.rfft2(y - prediction[:, :out_h, :out_w], s=(size, size), workers=-1)
            residual += fft.irfft2(
                np.sum(np.conj(error) * spectrum, axis=0).astype(np.complex128),
                s=(size, size),
                workers=-1,
            )[:kh, :kw]
        kernel = kernel + scipy.linalg.cho_solve(factor, residual.ravel()).reshape(kh, kw)
        passes.append(_pass(number, start, kernel, true_kernel))
    log.info(
        "closed form %d×%d: %s",
        kh,
        kw,
        ", ".join(f"{p['relative_error']:.1e} at {p['seconds']:.1f} s" for p in passes),
    )
    return {
        "passes": passes,
        "system": kh * kw,
        "final_error": passes[-1]["relative_error"],
        "total_s": passes[-1]["seconds"],
    }


def _blocks(images, targets, rows) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(rows), CHUNK):
        block = rows[start : start + CHUNK]
        yield (
            _whiten(gray(np.asarray(images[block], np.float32))),
            _whiten(gray(np.asarray(targets[block], np.float32))),
        )


def _pass(number: int, start: float, kernel: np.ndarray, true_kernel: np.ndarray) -> dict:
    return {
        "pass": number,
        "seconds": round(time.perf_counter() - start, 3),
        "relative_error": relative_error(kernel, true_kernel),
    }
