"""The stopping rule's measure: the Newton step, the kernel's remaining distance to the
least-squares optimum of a fixed set of training images, and that distance's own standard
error, from the two halves of the set. It reads only inputs, targets and weights, never
the true kernel.

With exact targets the optimum of any images is the true kernel: the step falls to zero
and the run has converged when it is below train.tolerance. With noise in the targets
(or a filter no linear layer is), every set of images has its own optimum, and the step
stops falling at their spread: the halves' optima differ by about twice the standard
error of the set's. A step within a few standard errors is at the noise floor.
"""

from __future__ import annotations

import numpy as np
from scipy import fft, signal

from src import streams
from src.normal_equations import _exact_is_cheap, _patches, four, normal_equations, spread
from src.training.batches import crops, whiten_pair

CHECK_IMAGES = 16  # whole training images the stopping rule measures on
EXACT_MAX_WEIGHTS = 128  # the halves' normal equations built exactly up to this
ACTIVATION_CHECK_IMAGES = 8  # with an activation: fewer, the Gauss–Newton rows are wider


def _slope(activation: str, z: np.ndarray) -> np.ndarray:
    if activation == "relu":
        return (z > 0).astype(z.dtype)
    if activation == "sigmoid":
        y = 1.0 / (1.0 + np.exp(-z))
        return y * (1.0 - y)
    if activation == "tanh":
        return 1.0 - np.tanh(z) ** 2
    return np.ones_like(z)


def _activate(activation: str, z: np.ndarray) -> np.ndarray:
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    return z


class NewtonStep:
    """`__call__(kernel, bias)` → (step, standard_error), each (F,): per filter, the Newton
    step's length from the set's optimum relative to the kernel's norm, ‖H⁻¹∇L‖ / ‖k‖, and
    half the distance between the two halves' Newton steps (the standard error of the
    set's optimum), on the same scale.

    x (n, H, W, C) and t (n, H', W', F) are the check images as training sees them
    (whitened and scaled for a linear layer; as they are, with a bias, for an activation).
    `inverse`: K-FAC's, for kernels too large for the exact equations.
    """

    def __init__(self, x, t, inverse, activation="linear"):
        self.x, self.t, self.inverse, self.activation = x, t, inverse, activation
        self.shape = (x.shape[1] - t.shape[1] + 1, x.shape[2] - t.shape[2] + 1)
        self.halves = (slice(0, max(len(x) // 2, 1)), slice(max(len(x) // 2, 1), len(x)))
        if len(x) < 2:
            self.halves = (slice(0, 1), slice(0, 1))
        taps = self.shape[0] * self.shape[1] * x.shape[-1]
        self.exact = taps + (activation != "linear") <= EXACT_MAX_WEIGHTS
        self.normal = None
        cheap = _exact_is_cheap(x, np.arange(len(x)), self.shape, x.shape[-1])
        if activation == "linear" and (self.exact or cheap):
            # each half's exact normal equations: its Newton step lands on its optimum, so
            # the halves' difference is the noise's alone (K-FAC's approximate steps would
            # add their own error to it, far from the optimum)
            self.normal = []
            for half in self.halves:
                rows = np.arange(len(x[half]))
                gram, right, *_, pixels = normal_equations(
                    x[half], t[half], rows, self.shape, "valid"
                )
                self.normal.append((gram, right, pixels))

    def _linear_exact(self, k: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        (g1, r1, m1), (g2, r2, m2) = self.normal
        full = np.linalg.lstsq(
            (g1 + g2) / (m1 + m2), ((g1 + g2) @ k - r1 - r2) / (m1 + m2), rcond=None
        )[0]
        halves = [np.linalg.lstsq(g / m, (g @ k - r) / m, rcond=None)[0] for g, r, m in self.normal]
        return full, halves

    def _linear_fft(self, k: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        kernel = k.reshape(*self.shape, self.x.shape[-1], -1)
        gradients = []
        for half in self.halves:
            x, t = self.x[half], self.t[half]
            with fft.set_workers(-1):
                prediction = sum(
                    signal.fftconvolve(
                        x[..., c : c + 1], kernel[None, ::-1, ::-1, c], mode="valid", axes=(1, 2)
                    )
                    for c in range(x.shape[-1])
                )
                residual = prediction - t  # (n, H', W', F)
                g = np.stack(
                    [
                        signal.fftconvolve(
                            x[..., c : c + 1], residual[:, ::-1, ::-1], mode="valid", axes=(1, 2)
                        ).sum(axis=0)
                        for c in range(x.shape[-1])
                    ],
                    axis=2,
                )  # (kh, kw, C, F)
            gradients.append((2.0 * g.reshape(-1, g.shape[-1]), residual[..., 0].size))
        total = sum(g for g, _ in gradients) / sum(m for _, m in gradients)
        return self.inverse @ total, [self.inverse @ (g / m) for g, m in gradients]

    def _gauss_newton(self, k: np.ndarray, bias: np.ndarray):
        weights = np.vstack([k, bias[None]])
        parts = []
        for half in self.halves:
            p = _patches(self.x[half], self.shape)
            p = np.hstack([p, np.ones((len(p), 1))])
            flat_t = self.t[half].reshape(-1, self.t.shape[-1])
            z = p @ weights
            residual = _activate(self.activation, z) - flat_t
            slope = _slope(self.activation, z)
            per_filter = []
            for f in range(weights.shape[1]):
                j = p * slope[:, f : f + 1]
                per_filter.append((j.T @ j, j.T @ residual[:, f]))
            parts.append(per_filter)
        steps = []
        for matrices in (
            [(a1 + a2, b1 + b2) for (a1, b1), (a2, b2) in zip(*parts)],
            *parts,
        ):
            steps.append(
                np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in matrices], axis=1)[:-1]
            )
        return steps[0], steps[1:]

    def __call__(self, kernel: np.ndarray, bias: np.ndarray | None = None):
        kernel = np.asarray(kernel, dtype=np.float64)
        k = kernel.reshape(-1, kernel.shape[-1])
        if self.activation != "linear" and self.exact:
            full, halves = self._gauss_newton(k, np.zeros(k.shape[1]) if bias is None else bias)
        elif self.normal is not None:
            full, halves = self._linear_exact(k)
        else:
            full, halves = self._linear_fft(k)
        norm = np.maximum(np.linalg.norm(k, axis=0), 1e-30)
        step = np.linalg.norm(full, axis=0) / norm
        error = np.linalg.norm(halves[0] - halves[1], axis=0) / (2.0 * norm)
        return step, error


def check_images(images, targets, train_rows, kernel_shape, padding, cfg, scale, activation):
    """The stopping rule's images, whole, as training sees them (whitened and scaled for a
    linear layer): float64 (x, t) for NewtonStep."""
    count = CHECK_IMAGES if activation == "linear" else ACTIVATION_CHECK_IMAGES
    rows = spread(train_rows, count)  # across the collection, not its first block
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
    if activation == "linear":
        x, t = whiten_pair(x * scale, t * scale, cfg.whiten)
    return four(np.asarray(x, np.float64)), four(np.asarray(t, np.float64))
