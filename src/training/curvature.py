"""The loss's curvature in the kernel, and K-FAC: its inverse, to precondition with.

For the loss mean((k ⋆ x − t)²) of one linear conv layer the Hessian in the kernel is
2·PᵀP/M, the covariance of the input patches P under the kernel, whatever the target.
Up to EXACT_HESSIAN_MAX_TAPS it is built from the patches themselves; above, from the
images' autocorrelation (a Toeplitz matrix, two FFTs at any kernel size).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
from scipy import fft, signal
from scipy.sparse.linalg import LinearOperator, eigsh

from src import streams

EXACT_HESSIAN_MAX_TAPS = 121  # curvature from the exact Hessian up to 11×11, estimated above


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
