"""The stopping rule's measure: the Newton step, the kernel's remaining distance to the
least-squares optimum of a fixed set of training images. It reads only inputs, targets
and weights, never the true kernel."""

from __future__ import annotations

import numpy as np
from scipy import fft, signal

from src import streams
from src.training.batches import crops, whiten_pair
from src.training.curvature import EXACT_HESSIAN_MAX_TAPS, exact_normal_equations

CHECK_IMAGES = 16  # whole training images the stopping rule measures on


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


def check_images(images, targets, train_rows, kernel_shape, padding, cfg, scale):
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
