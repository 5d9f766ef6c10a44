"""src/normal_equations.py and src/toeplitz.py: the closed-form least-squares filter against
a brute-force numpy.linalg.lstsq, its R² against a direct computation, and the Toeplitz
estimate of the patch covariance against the exact one."""

from __future__ import annotations

import numpy as np
import pytest

from src import normal_equations
from src.padding import same_padding
from src.toeplitz import toeplitz_covariance

RNG = np.random.default_rng(11)


def stack(count: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish float32 images in [0, 1]: neighbouring pixels correlated, as in photos."""
    rng = np.random.default_rng(seed)
    x = rng.random((count, height + 2, width + 2, channels))
    x = (x[:, 1:-1, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, 2:] + x[:, :-2, :-2]) / 4
    return x.astype(np.float32)


def design(images: np.ndarray, kernel_shape, padding: str):
    """Brute force: one column per (row, column, channel) tap, cut out by hand from the
    (zero-padded for 'same') images, and a ones column for the bias; and where each
    column's weight goes in the (kh, kw, C) kernel."""
    kh, kw = kernel_shape
    x = images.astype(np.float64)
    if padding == "same":
        (top, bottom), (left, right) = same_padding(kh, kw)
        x = np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    columns, taps = [], []
    for i in range(kh):
        for j in range(kw):
            for c in range(x.shape[-1]):
                columns.append(x[:, i : i + out_h, j : j + out_w, c].ravel())
                taps.append((i, j, c))
    columns.append(np.ones(len(columns[0])))
    return np.stack(columns, axis=1), taps, (out_h, out_w)


def noisy_targets(images, kernel, padding, seed=0):
    """The correlation with `kernel` (kh, kw, C, F), a bias, and noise: a least-squares
    problem whose answer is not the kernel itself."""
    a, taps, shape = design(images, kernel.shape[:2], padding)
    flat = np.array([kernel[i, j, c] for i, j, c in taps] + [np.arange(kernel.shape[-1]) + 0.5])
    t = a @ flat + 0.05 * np.random.default_rng(seed).normal(size=(len(a), kernel.shape[-1]))
    return t.reshape(len(images), *shape, kernel.shape[-1]).astype(np.float32)


def brute_force(images, targets, rows, kernel_shape, padding):
    a, taps, _ = design(images[rows], kernel_shape, padding)
    t = targets[rows].astype(np.float64).reshape(len(a), -1)
    solution = np.linalg.lstsq(a, t, rcond=None)[0]
    kernel = np.zeros((*kernel_shape, images.shape[-1], t.shape[1]))
    for (i, j, c), weights in zip(taps, solution[:-1]):
        kernel[i, j, c] = weights
    return kernel, solution[-1]


CASES = [
    # (channels, filters, kernel_shape, padding): an even side, a non-square kernel
    (1, 1, (3, 3), "valid"),
    (1, 2, (4, 3), "same"),
    (3, 1, (3, 2), "valid"),
    (3, 2, (2, 3), "same"),
]


@pytest.mark.parametrize("path", ["exact", "cg"])
@pytest.mark.parametrize("channels, filters, kernel_shape, padding", CASES)
def test_least_squares_is_numpys_lstsq_with_a_ones_column(
    monkeypatch, path, channels, filters, kernel_shape, padding
):
    if path == "cg":  # every kernel above the exact limit: conjugate gradients by FFTs
        monkeypatch.setattr(normal_equations, "EXACT_MAX_WEIGHTS", 1)
        monkeypatch.setattr(normal_equations, "EXACT_MAX_WORK", 0)  # small images too
    images = stack(5, 14, 12, channels, seed=channels + filters)
    true = RNG.normal(size=(*kernel_shape, channels, filters))
    targets = noisy_targets(images, true, padding)
    rows = np.array([4, 0, 2, 3])  # unsorted, one image left out
    solution = normal_equations.least_squares(images, targets, rows, kernel_shape, padding)
    kernel, bias = brute_force(images, targets, np.sort(rows), kernel_shape, padding)
    assert solution.method == path
    assert solution.kernel.shape == (*kernel_shape, channels, filters)
    assert solution.bias.shape == (filters,)
    assert solution.pixels == 4 * targets.shape[1] * targets.shape[2]
    assert solution.weights == kernel_shape[0] * kernel_shape[1] * channels + 1
    np.testing.assert_allclose(solution.kernel, kernel, rtol=0, atol=1e-8 * np.abs(kernel).max())
    np.testing.assert_allclose(solution.bias, bias, rtol=0, atol=1e-8 * np.abs(bias).max())
    assert np.abs(solution.kernel - true).max() > 1e-4, "noise: the answer is not the kernel"
    if path == "exact":
        a, _, _ = design(images[np.sort(rows)], kernel_shape, padding)
        centred = a[:, :-1] - a[:, :-1].mean(axis=0)
        assert solution.condition == pytest.approx(np.linalg.cond(centred.T @ centred), rel=1e-6)


def test_a_large_kernel_on_a_few_small_images_is_solved_exactly():
    """A kernel above EXACT_MAX_WEIGHTS on little data, where the Toeplitz preconditioner is
    poor and CG stopped unconverged (2.4e-3 from numpy's lstsq): the exact equations cost
    little there, and give the least-squares kernel."""
    images = pink_like(4, 40)
    true = RNG.normal(size=(20, 20, 1, 1))
    a, taps, shape = design(images, (20, 20), "valid")
    targets = (a[:, :-1] @ np.array([true[i, j, c, 0] for i, j, c in taps])).reshape(4, *shape, 1)
    solution = normal_equations.least_squares(images, targets, np.arange(4), (20, 20), "valid")
    assert solution.method == "exact"
    kernel, _ = brute_force(images, targets, np.arange(4), (20, 20), "valid")
    assert np.sum((kernel - true) ** 2) / np.sum(true**2) < 1e-10  # the data determine it
    assert np.sum((solution.kernel - kernel) ** 2) / np.sum(kernel**2) < 1e-8


def pink_like(count: int, size: int, seed: int = 1) -> np.ndarray:
    """(N, S, S, 1) images with a 1/f² power spectrum, in [0, 1]."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / size)
    shape = (count, size, size // 2 + 1)
    x = np.fft.irfft2(amplitude * (rng.normal(size=shape) + 1j * rng.normal(size=shape)))
    x -= x.min(axis=(1, 2), keepdims=True)
    x /= x.max(axis=(1, 2), keepdims=True)
    return x[..., None].astype(np.float32)


def test_exact_targets_give_back_the_kernel_and_bias():
    images = stack(4, 16, 16, 3)
    true = RNG.normal(size=(3, 3, 3, 2))
    a, taps, shape = design(images, (3, 3), "valid")
    flat = np.array([true[i, j, c] for i, j, c in taps] + [[0.25, -2.0]])
    targets = (a @ flat).reshape(4, *shape, 2)
    solution = normal_equations.least_squares(images, targets, np.arange(4), (3, 3), "valid")
    np.testing.assert_allclose(solution.kernel, true, atol=1e-9)
    np.testing.assert_allclose(solution.bias, [0.25, -2.0], atol=1e-9)


def test_a_stack_of_gray_rows_gets_its_channel_axis():
    """(N, H, W) images and targets, as the gray stage writes them, are one channel."""
    images = stack(4, 12, 12, 1)
    targets = noisy_targets(images, RNG.normal(size=(3, 3, 1, 1)), "valid")
    rows = np.arange(4)
    four = normal_equations.least_squares(images, targets, rows, (3, 3), "valid")
    three = normal_equations.least_squares(images[..., 0], targets[..., 0], rows, (3, 3), "valid")
    np.testing.assert_array_equal(three.kernel, four.kernel)
    np.testing.assert_array_equal(three.bias, four.bias)


def direct_r2(images, targets, rows, kernel, bias, padding):
    a, taps, _ = design(images[rows], kernel.shape[:2], padding)
    flat = np.array([kernel[i, j, c] for i, j, c in taps] + [bias])
    t = targets[rows].astype(np.float64).reshape(len(a), -1)
    residual = t - a @ flat
    # a bank's R²: the residuals against each filter's variance around its own mean
    return np.mean(residual**2), 1.0 - np.mean(residual**2) / np.mean(np.var(t, axis=0))


@pytest.mark.parametrize("path", ["exact", "fft"])
@pytest.mark.parametrize("channels, filters, kernel_shape, padding", CASES)
def test_residuals_r2_is_the_direct_computation(
    monkeypatch, path, channels, filters, kernel_shape, padding
):
    if path == "fft":
        monkeypatch.setattr(normal_equations, "EXACT_MAX_WEIGHTS", 1)
        monkeypatch.setattr(normal_equations, "EXACT_MAX_WORK", 0)  # small images too
    images = stack(6, 13, 13, channels, seed=3)
    true = RNG.normal(size=(*kernel_shape, channels, filters))
    targets = noisy_targets(images, true, padding, seed=1)
    rows = np.array([5, 1, 3])
    kernel = true + 0.03 * RNG.normal(size=true.shape)  # any filter, not only the best one
    bias = np.arange(filters) + 0.5 + 0.01 * RNG.normal(size=filters)
    mse, r2 = normal_equations.residuals(images, targets, rows, kernel, bias, padding)
    expected_mse, expected_r2 = direct_r2(images, targets, np.sort(rows), kernel, bias, padding)
    assert mse == pytest.approx(expected_mse, rel=1e-9)
    assert r2 == pytest.approx(expected_r2, rel=1e-9)
    assert r2 < 1


def test_the_closed_form_has_the_highest_r2():
    images = stack(6, 16, 16, 1, seed=5)
    targets = noisy_targets(images, RNG.normal(size=(3, 3, 1, 1)), "valid")
    rows = np.arange(6)
    best = normal_equations.least_squares(images, targets, rows, (3, 3), "valid")
    _, r2 = normal_equations.residuals(images, targets, rows, best.kernel, best.bias, "valid")
    for _ in range(3):
        other = best.kernel + 1e-3 * RNG.normal(size=best.kernel.shape)
        assert normal_equations.residuals(images, targets, rows, other, best.bias, "valid")[1] < r2


# --- the Toeplitz estimate -----------------------------------------------------------


def second_moment(x: np.ndarray, kernel_shape, pad: bool = False) -> np.ndarray:
    """The exact PᵀP/M of the 'valid' patches (or of every patch that overlaps the
    image, zero-padded, with `pad`), taps ordered row, column, channel."""
    kh, kw = kernel_shape
    if pad:
        x = np.pad(x, [(0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)])
    a, _, _ = design(x, kernel_shape, "valid")
    return a[:, :-1].T @ a[:, :-1] / len(a)


@pytest.mark.parametrize("channels, kernel_shape", [(1, (3, 3)), (1, (4, 2)), (3, (3, 2))])
def test_the_biased_toeplitz_estimate_is_the_zero_padded_images_exact_second_moment(
    channels, kernel_shape
):
    """Every lag's sum over the whole image, divided by its area: exactly PᵀP of all the
    patches that overlap the zero-padded images, divided by the images' pixels."""
    x = RNG.normal(size=(3, 11, 9, channels))
    kh, kw = kernel_shape
    padded_patches = 3 * (11 + kh - 1) * (9 + kw - 1)
    exact = second_moment(x, kernel_shape, pad=True) * padded_patches / x[..., 0].size
    np.testing.assert_allclose(toeplitz_covariance(x, kernel_shape), exact, atol=1e-12)


@pytest.mark.parametrize("biased", [True, False])
def test_the_toeplitz_estimate_approaches_the_exact_patch_covariance_on_large_images(biased):
    """On stationary images the estimate's error falls as the kernel's share of the image
    does: several per cent on 32², under one on 256²."""
    errors = []
    for size in (32, 256):
        x = stack(4, size, size, 3, seed=size).astype(np.float64)
        exact = second_moment(x, (3, 3))
        estimate = toeplitz_covariance(x, (3, 3), biased=biased)
        errors.append(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 4


def test_the_unbiased_estimate_is_closer_at_long_lags():
    """normal_equations' CG preconditioner uses it for that reason."""
    x = stack(8, 24, 24, 1, seed=2).astype(np.float64)
    exact = second_moment(x, (9, 9))
    biased, unbiased = (toeplitz_covariance(x, (9, 9), biased=b) for b in (True, False))
    assert np.linalg.norm(unbiased - exact) < np.linalg.norm(biased - exact) / 2
