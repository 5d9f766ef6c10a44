"""The Toeplitz estimate of the input-patch covariance, in NumPy: the curvature K-FAC
preconditions with (src/training/curvature.py) and the closed form's CG preconditioner
(src/normal_equations.py).

Entry ((a, c), (b, c')) of the patch covariance PᵀP/M is the mean of x_c[q + a]·x_c'[q + b]
over the patches q: close to the images' cross-correlation r_cc' at lag b − a, which two
FFTs give at any kernel size. Taps are ordered as Conv2D flattens its kernel: row, column,
channel (channel fastest).
"""

from __future__ import annotations

import numpy as np
from scipy import fft


def cross_correlations(x: np.ndarray, kernel_shape: tuple[int, int], biased: bool = True):
    """r[c, c', dy, dx] = mean of x_c[q]·x_c'[q + d] over the lags d of a kernel_shape
    window, lag 0 at (kh − 1, kw − 1). x is (N, H, W, C). `biased`: every lag's sum is
    divided by the images' area (the Toeplitz matrix is then positive semi-definite, as a
    covariance is), else by the lag's overlap."""
    n, h, w, _ = x.shape
    kh, kw = kernel_shape
    shape = (h + kh - 1, w + kw - 1)  # long enough that lags below the kernel's don't wrap
    spectrum = fft.rfft2(x, s=shape, axes=(1, 2), workers=-1)
    power = np.einsum("nhwc,nhwd->cdhw", np.conj(spectrum), spectrum)
    correlation = fft.irfft2(power, s=shape, axes=(2, 3), workers=-1)
    dy, dx = np.arange(1 - kh, kh), np.arange(1 - kw, kw)
    overlaps = n * h * w if biased else n * np.outer(h - np.abs(dy), w - np.abs(dx))
    return correlation[:, :, dy[:, None] % shape[0], dx[None, :] % shape[1]] / overlaps


def toeplitz_covariance(
    x: np.ndarray, kernel_shape: tuple[int, int], biased: bool = True
) -> np.ndarray:
    """(kh·kw·C, kh·kw·C): the patch covariance's Toeplitz estimate on (N, H, W, C) x
    (`biased`: see cross_correlations)."""
    kh, kw = kernel_shape
    channels = x.shape[-1]
    r = cross_correlations(np.asarray(x, dtype=np.float64), kernel_shape, biased)
    rows, cols, chans = (a.ravel() for a in np.indices((kh, kw, channels)))
    lag_y = rows[None, :] - rows[:, None] + kh - 1
    lag_x = cols[None, :] - cols[:, None] + kw - 1
    return r[chans[:, None], chans[None, :], lag_y, lag_x]
