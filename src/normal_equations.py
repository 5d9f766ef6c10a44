"""The closed-form best linear filter: least squares on all training images, in NumPy.

The layer's prediction of target pixel q of filter f is Σ_a k[a, f]·x[q + a] + b[f], a
linear map of the patch under the kernel, so the best kernel and bias on the training
images solve the normal equations of the centred patches P (one row a pixel, one column a
tap and channel) and targets t:

    (PᵀP − M·μμᵀ) k = Pᵀt − M·μ·t̄,    b = t̄ − μᵀk,

μ the mean patch, M the pixel count. Up to EXACT_MAX_WEIGHTS weights the matrix is built
exactly in float64 (one product image a lag and channel pair, see normal_equations), and
so is a larger kernel on small images; above, it is solved by conjugate gradients with
exact products from FFTs (a product is two FFTs an image), preconditioned by the Toeplitz
estimate K-FAC uses. No TensorFlow: the train
stage solves it on a thread while TensorFlow imports.

Images are (N, H, W, C) and targets (N, H', W', F), as the stages write them; 'same'
targets are the 'valid' ones of the zero-padded images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import fft

from src.padding import same_padding
from src.toeplitz import toeplitz_covariance

EXACT_MAX_WEIGHTS = 150  # taps × channels built exactly up to this (~1 s for 3×3 on 410 × 256²)
EXACT_MAX_WORK = 2e9  # ... or above, while lag pairs × pixels stays under this (small images)
EXACT_MAX_BYTES = 512 * 2**20  # ... and their integral images under this
CONDITION_SOLVE = 1e12  # worse conditioned: the least-norm solution (and not identifiable)
CG_TOLERANCE = 1e-10  # relative residual of the normal equations where CG stops (~1e-15 error)
CG_MAX_ITERATIONS = 60
BATCH_IMAGES = 32  # images read at once
SPECTRA_MAX_BYTES = 512 * 2**20  # the images' spectra are kept between CG products up to this


def spread(rows: np.ndarray, count: int) -> np.ndarray:
    """`count` of the rows evenly spaced through them, sorted: a collection stored in blocks
    by name (skies, then forests) is sampled across its blocks, not from the first one."""
    rows = np.sort(np.asarray(rows))
    if len(rows) <= count:
        return rows
    return rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]


def four(a: np.ndarray) -> np.ndarray:
    """Images or targets as (N, H, W, C): a stack of 3-D rows gets a channel axis."""
    a = np.asarray(a)
    return a[..., None] if a.ndim == 3 else a


def padded(x: np.ndarray, kernel_shape: tuple[int, int], padding: str) -> np.ndarray:
    """The images whose 'valid' patches are the layer's patches in `padding`."""
    if padding != "same":
        return x
    (top, bottom), (left, right) = same_padding(*kernel_shape)
    return np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])


@dataclass
class Solution:
    kernel: np.ndarray  # (kh, kw, C, F) float64
    bias: np.ndarray  # (F,)
    pixels: int  # equations per filter: training target pixels
    weights: int  # unknowns per filter: taps × channels + 1
    condition: float | None  # of the centred patch covariance, when built exactly
    method: str  # exact | cg
    iterations: int
    seconds: float
    converged: bool = True  # cg: reached CG_TOLERANCE within CG_MAX_ITERATIONS


def _batches(images, targets, rows, kernel_shape, padding):
    for start in range(0, len(rows), BATCH_IMAGES):
        chunk = np.sort(rows[start : start + BATCH_IMAGES])
        x = padded(four(images[chunk]).astype(np.float64), kernel_shape, padding)
        yield x, four(targets[chunk]).astype(np.float64)


def _patches(x: np.ndarray, kernel_shape: tuple[int, int]) -> np.ndarray:
    """(pixels, kh·kw·C) patch rows of (n, H, W, C) images, ordered as Conv2D flattens."""
    kh, kw = kernel_shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    # (n, H', W', C, kh, kw) -> (n, H', W', kh, kw, C)
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[-1])


def _rect(integral: np.ndarray, top: int, left: int, height: int, width: int) -> float:
    """The sum of a height×width rectangle from (top, left), from an integral image."""
    return (
        integral[top + height, left + width]
        - integral[top, left + width]
        - integral[top + height, left]
        + integral[top, left]
    )


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    out[1:, 1:] = a.cumsum(axis=0).cumsum(axis=1)
    return out


def normal_equations(images, targets, rows, kernel_shape, padding):
    """(PᵀP, Pᵀt, Σp, Σt, Σt², M) over the rows, exactly, in float64, without building the
    patches: entry ((a, c), (b, c')) of PᵀP is the sum of x_c[p]·x_c'[p + b − a] over the
    rectangle of positions p = q + a (q a valid output), so one product image a lag and
    channel pair, summed over the images, gives every entry of that lag from its integral
    image. That is ~2·kh·kw·C² passes over the pixels, against (kh·kw·C)² multiply-adds a
    pixel for PᵀP built from the patches."""
    kh, kw = kernel_shape
    lags = [(dy, dx) for dy in range(kh) for dx in range(1 - kw, kw) if dy > 0 or dx >= 0]
    products = right = patch_sum = target_sum = target_sq = None
    pixels = 0
    for x, t in _batches(images, targets, rows, kernel_shape, padding):
        n, h, w, channels = x.shape
        vh, vw, filters = t.shape[1], t.shape[2], t.shape[3]
        if products is None:
            products = {}
            right = np.zeros((kh, kw, channels, filters))
            patch_sum = np.zeros((h, w, channels))
            target_sum, target_sq = np.zeros(filters), np.zeros(filters)
        for dy, dx in lags:
            top, left = max(0, -dy), max(0, -dx)
            rows_, cols_ = h - abs(dy), w - abs(dx)
            for c in range(channels):
                first = x[:, top : top + rows_, left : left + cols_, c]
                for c2 in range(channels):
                    second = x[:, top + dy : top + dy + rows_, left + dx : left + dx + cols_, c2]
                    key = (dy, dx, c, c2)
                    value = np.einsum("nhw,nhw->hw", first, second)
                    products[key] = value if key not in products else products[key] + value
        for i in range(kh):
            for j in range(kw):
                window = x[:, i : i + vh, j : j + vw]  # (n, vh, vw, C)
                right[i, j] += np.einsum("nhwc,nhwf->cf", window, t)
        patch_sum += x.sum(axis=0)
        target_sum += t.sum(axis=(0, 1, 2))
        target_sq += np.einsum("nhwf,nhwf->f", t, t)
        pixels += n * vh * vw
    taps = [(i, j, c) for i in range(kh) for j in range(kw) for c in range(channels)]
    keys = {key: index for index, key in enumerate(products)}
    # one integral image a lag and channel pair, padded to one shape with its own edge
    # (a rectangle inside the product image sums the same)
    integrals = np.stack(
        [
            np.pad(_integral(v), [(0, h - v.shape[0]), (0, w - v.shape[1])], mode="edge")
            for v in products.values()
        ]
    )
    i, j, c = (np.array(column)[:, None] for column in zip(*taps))
    i2, j2, c2 = i.T, j.T, c.T
    dy, dx = i2 - i, j2 - j  # every pair's lag
    mirrored = ~((dy > 0) | ((dy == 0) & (dx >= 0)))  # a lag of the other half plane: swap
    ai, aj = np.where(mirrored, i2, i), np.where(mirrored, j2, j)
    by, bx = np.where(mirrored, -dy, dy), np.where(mirrored, -dx, dx)
    first, second = np.where(mirrored, c2, c), np.where(mirrored, c, c2)
    lag_index = np.full((kh, 2 * kw - 1), -1)
    for (ly, lx, lc, lc2), n in keys.items():
        if lc == 0 and lc2 == 0:
            lag_index[ly, lx + kw - 1] = n // (channels * channels)
    index = lag_index[by, bx + kw - 1] * channels * channels + first * channels + second
    top, left = ai - np.maximum(0, -by), aj - np.maximum(0, -bx)
    # positions p = q + a of the first tap, in the product image's coordinates
    gram = (
        integrals[index, top + vh, left + vw]
        - integrals[index, top, left + vw]
        - integrals[index, top + vh, left]
        + integrals[index, top, left]
    )
    integral = np.stack([_integral(patch_sum[..., c]) for c in range(channels)], axis=-1)
    sums = np.array([_rect(integral[..., c], i, j, vh, vw) for i, j, c in taps])
    return gram, right.reshape(-1, right.shape[-1]), sums, target_sum, target_sq, pixels


def _exact(images, targets, rows, kernel_shape, padding):
    gram, right, patch_sum, target_sum, _, pixels = normal_equations(
        images, targets, rows, kernel_shape, padding
    )
    mean_patch, mean_target = patch_sum / pixels, target_sum / pixels
    covariance = gram / pixels - np.outer(mean_patch, mean_patch)
    cross = right / pixels - np.outer(mean_patch, mean_target)
    values = np.linalg.eigvalsh(covariance)
    condition = float(values[-1] / values[0]) if values[0] > 0 else float("inf")
    if condition < CONDITION_SOLVE:
        kernel = np.linalg.solve(covariance, cross)
    else:  # the images do not determine every weight: the least-norm kernel that fits
        kernel = np.linalg.lstsq(covariance, cross, rcond=1.0 / CONDITION_SOLVE)[0]
    return kernel, mean_target - mean_patch @ kernel, pixels, condition


class _Products:
    """v ↦ (PᵀP/M − μμᵀ) v for (taps·C, F) v, by FFTs over all the rows' images."""

    def __init__(self, images, targets, rows, kernel_shape, padding):
        self.kernel_shape = kernel_shape
        self.source = (images, targets, rows, padding)
        self.spectra: list[np.ndarray] | None = []
        self.pixels, right, patch_sum, target_sum = 0, None, None, None
        kh, kw = kernel_shape
        spent = 0
        for x, t in _batches(images, targets, rows, kernel_shape, padding):
            n, h, w, c = x.shape
            self.size = (h, w)
            spectrum = fft.rfft2(x, axes=(1, 2), workers=-1)  # (n, h, w/2+1, C)
            # Pᵀt: the correlation of each image with its target, lags 0..kh-1, 0..kw-1
            t_spectrum = fft.rfft2(t, s=(h, w), axes=(1, 2), workers=-1)
            lags = fft.irfft2(
                np.einsum("nhwf,nhwc->hwcf", np.conj(t_spectrum), spectrum),
                s=(h, w),
                axes=(0, 1),
                workers=-1,
            )[:kh, :kw]
            right = lags if right is None else right + lags
            sums = _box_sums(x, t.shape[1:3])  # (n, kh, kw, C): each tap's sum over patches
            patch_sum = sums.sum(axis=0) if patch_sum is None else patch_sum + sums.sum(axis=0)
            ts = t.sum(axis=(0, 1, 2))
            target_sum = ts if target_sum is None else target_sum + ts
            self.pixels += n * t.shape[1] * t.shape[2]
            self.valid = t.shape[1:3]
            spent += spectrum.nbytes
            if self.spectra is not None and spent <= SPECTRA_MAX_BYTES:
                self.spectra.append(spectrum)
            else:
                self.spectra = None
        self.channels = patch_sum.shape[-1]
        self.right = right.reshape(-1, right.shape[-1]) / self.pixels
        self.mean_patch = patch_sum.reshape(-1) / self.pixels
        self.mean_target = target_sum / self.pixels
        self.cross = self.right - np.outer(self.mean_patch, self.mean_target)

    def _spectra(self):
        if self.spectra is not None:
            yield from self.spectra
            return
        images, targets, rows, padding = self.source
        for x, _ in _batches(images, targets, rows, self.kernel_shape, padding):
            yield fft.rfft2(x, axes=(1, 2), workers=-1)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        kh, kw = self.kernel_shape
        h, w = self.size
        vh, vw = self.valid
        k = v.reshape(kh, kw, self.channels, -1)
        k_spectrum = np.conj(fft.rfft2(k, s=(h, w), axes=(0, 1), workers=-1))  # (h, w', C, F)
        total = 0.0
        for spectrum in self._spectra():
            z = fft.irfft2(
                np.einsum("nhwc,hwcf->nhwf", spectrum, k_spectrum),
                s=(h, w),
                axes=(1, 2),
                workers=-1,
            )
            z[:, vh:] = 0.0
            z[:, :, vw:] = 0.0
            z_spectrum = fft.rfft2(z, axes=(1, 2), workers=-1)
            total = total + np.einsum("nhwf,nhwc->hwcf", np.conj(z_spectrum), spectrum)
        back = fft.irfft2(total, s=(h, w), axes=(0, 1), workers=-1)[:kh, :kw]
        product = back.reshape(-1, back.shape[-1]) / self.pixels
        return product - np.outer(self.mean_patch, self.mean_patch @ v)


def _box_sums(x: np.ndarray, valid: tuple[int, int]) -> np.ndarray:
    """(n, kh, kw, C): Σ over the valid positions q of x[q + a], for every tap a."""
    vh, vw = valid
    n, h, w, c = x.shape
    kh, kw = h - vh + 1, w - vw + 1
    integral = np.zeros((n, h + 1, w + 1, c))
    integral[:, 1:, 1:] = x.cumsum(axis=1).cumsum(axis=2)
    a, b = np.arange(kh), np.arange(kw)
    return (
        integral[:, a[:, None] + vh, b[None, :] + vw]
        - integral[:, a[:, None], b[None, :] + vw]
        - integral[:, a[:, None] + vh, b[None, :]]
        + integral[:, a[:, None], b[None, :]]
    )


def _toeplitz_inverse(images, rows, kernel_shape, padding, mean_patch):
    """The inverse of the centred patch covariance's Toeplitz estimate, on a few images:
    the preconditioner of CG (src/training/curvature.py builds the same for K-FAC)."""
    x = padded(four(images[spread(rows, 64)]).astype(np.float64), kernel_shape, padding)
    # unbiased: each lag's mean over its own overlap, closer to the exact matrix at long
    # lags than the biased estimate (CG then needs a few passes, not dozens)
    covariance = toeplitz_covariance(x, kernel_shape, biased=False) - np.outer(
        mean_patch, mean_patch
    )
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, values[-1] * 1e-10)
    return (vectors / values) @ vectors.T


def _conjugate_gradients(products: _Products, inverse: np.ndarray, start: np.ndarray | None):
    b = products.cross
    k = np.zeros_like(b) if start is None else start.reshape(b.shape).copy()
    r = b - products(k) if start is not None else b.copy()
    z = inverse @ r
    p = z.copy()
    rz = np.einsum("nf,nf->f", r, z)
    scale = np.linalg.norm(b, axis=0)
    iterations = 0
    while iterations < CG_MAX_ITERATIONS and np.any(
        np.linalg.norm(r, axis=0) > CG_TOLERANCE * scale
    ):
        q = products(p)
        alpha = rz / np.maximum(np.einsum("nf,nf->f", p, q), 1e-300)
        k += p * alpha
        r -= q * alpha
        z = inverse @ r
        rz_next = np.einsum("nf,nf->f", r, z)
        p = z + p * (rz_next / np.maximum(rz, 1e-300))
        rz = rz_next
        iterations += 1
    return k, iterations


def _exact_is_cheap(images, rows, kernel_shape, channels) -> bool:
    """Whether the exact equations of a large kernel cost little: small images (a lag's
    product image is a pass over the pixels, its integral image kept for the gather)."""
    kh, kw = kernel_shape
    pairs = 2 * kh * kw * channels * channels
    pixels = len(rows) * images.shape[1] * images.shape[2]
    kept = pairs * images.shape[1] * images.shape[2] * 8
    return pairs * pixels <= EXACT_MAX_WORK and kept <= EXACT_MAX_BYTES


def least_squares(
    images,
    targets,
    rows: np.ndarray,
    kernel_shape: tuple[int, int],
    padding: str,
    start: np.ndarray | None = None,
) -> Solution:
    """The least-squares kernel (kh, kw, C, F) and biases (F,) of a conv layer on the
    rows' images and targets, in `padding`. `start`: a kernel to warm-start CG from."""
    started = time.perf_counter()
    rows = np.asarray(rows)
    kh, kw = kernel_shape
    channels = four(images[rows[:1]]).shape[-1]
    filters = four(targets[rows[:1]]).shape[-1]
    taps = kh * kw * channels
    if taps <= EXACT_MAX_WEIGHTS or _exact_is_cheap(images, rows, kernel_shape, channels):
        kernel, bias, pixels, condition = _exact(images, targets, rows, kernel_shape, padding)
        method, iterations, converged = "exact", 0, True
    else:
        products = _Products(images, targets, rows, kernel_shape, padding)
        inverse = _toeplitz_inverse(images, rows, kernel_shape, padding, products.mean_patch)
        kernel, iterations = _conjugate_gradients(products, inverse, start)
        converged = iterations < CG_MAX_ITERATIONS
        bias = products.mean_target - products.mean_patch @ kernel
        pixels, condition, method = products.pixels, None, "cg"
    return Solution(
        kernel=kernel.reshape(kh, kw, channels, filters),
        bias=np.asarray(bias, dtype=np.float64),
        pixels=int(pixels),
        weights=taps + 1,
        condition=condition,
        method=method,
        iterations=iterations,
        seconds=time.perf_counter() - started,
        converged=converged,
    )


def residuals(images, targets, rows, kernel: np.ndarray, bias: np.ndarray, padding: str):
    """(mean squared residual, R²) of a linear filter on the rows' whole images: the
    val_loss and explained_variance of the closed form, on the same footing as training's."""
    kh, kw = kernel.shape[:2]
    flat = kernel.reshape(-1, kernel.shape[-1])
    sq = total = total_sq = 0.0
    count = 0
    for x, t in _batches(images, targets, np.asarray(rows), (kh, kw), padding):
        if flat.shape[0] <= EXACT_MAX_WEIGHTS:
            prediction = _patches(x, (kh, kw)) @ flat + bias
        else:
            prediction = _fft_predict(x, kernel, bias)
        flat_t = t.reshape(-1, t.shape[-1])
        sq += float(np.sum((prediction.reshape(flat_t.shape) - flat_t) ** 2))
        total = total + flat_t.sum(axis=0)
        total_sq = total_sq + (flat_t**2).sum(axis=0)
        count += len(flat_t)
    mse = sq / (count * flat.shape[1])  # over every pixel of every filter
    # R² of the bank: 1 − Σ residual² / Σ each filter's variance around its own mean
    variance = float(np.sum(total_sq / count - (total / count) ** 2))
    return mse, 1.0 - mse * flat.shape[1] / variance if variance > 0 else float("nan")


def _fft_predict(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    n, h, w, c = x.shape
    spectrum = fft.rfft2(x, axes=(1, 2), workers=-1)
    k_spectrum = np.conj(fft.rfft2(kernel, s=(h, w), axes=(0, 1), workers=-1))
    out = fft.irfft2(
        np.einsum("nhwc,hwcf->nhwf", spectrum, k_spectrum), s=(h, w), axes=(1, 2), workers=-1
    )
    return out[:, : h - kh + 1, : w - kw + 1] + bias
