"""The loss's curvature in the kernel, and K-FAC: its inverse, to precondition with.

For the loss mean((k ⋆ x − t)²) of one linear conv layer the Hessian in the kernel is
2·PᵀP/M, the covariance of the input patches P under the kernel (every tap and channel),
whatever the target, and the same for every filter of a bank. K-FAC uses its Toeplitz
estimate (src/toeplitz.py: two FFTs at any kernel size). The top curvature sizes plain
SGD's steps (train.precondition none) and the original recipe's data scale.
"""

from __future__ import annotations

import numpy as np
from scipy import signal
from scipy.sparse.linalg import LinearOperator, eigsh

from src import streams
from src.normal_equations import _exact_is_cheap, _patches, four, normal_equations
from src.toeplitz import cross_correlations, toeplitz_covariance

EXACT_HESSIAN_MAX_TAPS = 121  # curvature from the exact Hessian up to 11×11, estimated above


def top_curvature(x: np.ndarray, kernel_shape: tuple[int, int], seed: int) -> float:
    """Largest eigenvalue of the MSE loss's Hessian in the kernel, on the batch x
    (N, H, W, C). Exact up to EXACT_HESSIAN_MAX_TAPS taps × channels; above, from the
    Toeplitz estimate's top eigenvector (Lanczos), whose Rayleigh quotient on the exact
    Hessian is never above the true value (98.5 % of it at 32×32 on whitened crops)."""
    x = four(np.asarray(x, dtype=np.float64))
    kh, kw = kernel_shape
    taps = kh * kw * x.shape[-1]
    if taps <= EXACT_HESSIAN_MAX_TAPS:
        patches = _patches(x, kernel_shape)
        return float(np.linalg.eigvalsh(2.0 * patches.T @ patches / len(patches))[-1])
    if x.shape[-1] > 1:
        return float(np.linalg.eigvalsh(2.0 * toeplitz_covariance(x, kernel_shape))[-1])
    r = cross_correlations(x, kernel_shape, biased=False)[0, 0]
    if not np.any(r):
        return 0.0  # all-zero crops; ARPACK refuses a zero operator

    def toeplitz_times(v: np.ndarray) -> np.ndarray:  # (Tv)[a] = Σ_b r[b−a]·v[b]
        return signal.correlate(r, v.reshape(kh, kw), mode="valid")[::-1, ::-1].ravel()

    operator = LinearOperator((taps, taps), matvec=toeplitz_times, dtype=np.float64)
    start = streams.rng(seed, streams.CURVATURE).standard_normal(taps)
    v = eigsh(operator, k=1, which="LA", v0=start, tol=1e-6)[1][:, 0].reshape(kh, kw)
    outputs = signal.fftconvolve(x[..., 0], v[None, ::-1, ::-1], mode="valid", axes=(1, 2))
    return float(2.0 * np.mean(outputs**2) / np.sum(v**2))


class Preconditioner:
    """The inverse of the loss's Hessian in the kernel, estimated on images x (N, H, W, C):
    `inverse` (taps·C, taps·C), ordered as the Conv2D kernel flattens.

    A whitened photo's spectrum is not flat, so plain gradient descent still sees a
    spread of curvatures; times this inverse, every direction has curvature about 1.
    """

    def __init__(self, x: np.ndarray, kernel_shape: tuple[int, int]):
        x = four(np.asarray(x, np.float64))
        if _exact_is_cheap(x, np.arange(len(x)), kernel_shape, x.shape[-1]):
            # few pixels: the sample's exact patch second moment (its Hessian itself), where
            # the Toeplitz estimate's borders would weigh most
            zero = np.zeros(
                (len(x), x.shape[1] - kernel_shape[0] + 1, x.shape[2] - kernel_shape[1] + 1, 1)
            )
            gram, *_, pixels = normal_equations(x, zero, np.arange(len(x)), kernel_shape, "valid")
            covariance = 2.0 * gram / pixels
        else:
            covariance = 2.0 * toeplitz_covariance(x, kernel_shape)
        values, vectors = np.linalg.eigh(covariance)
        if not values[-1] > 0:
            raise ValueError("the images have no contrast")
        # a floor under the eigenvalues: directions the images hardly excite (flat photos,
        # no whitening) get a damped step instead of an unbounded one
        values = np.maximum(values, values[-1] * 1e-6)
        self.inverse = (vectors / values) @ vectors.T
        self.covariance = covariance
