"""Dead-leaves images: seeded per (seed, index), covering the canvas, and natural-looking
in the sense that matters here: a ≈1/f² power spectrum and sharp edges."""

from __future__ import annotations

import numpy as np
import pytest

from src import dead_leaves


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0


def radial_power(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(frequency, mean power) in log-spaced rings, averaged over the images' spectra."""
    size = images[0].shape[0]
    power = np.zeros((size, size))
    for image in images:
        gray = luma(image)
        power += np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    edges = np.geomspace(2 / size, 0.45, 16)
    ring = np.digitize(f.ravel(), edges)
    mean = np.array([power.ravel()[ring == k].mean() for k in range(1, len(edges))])
    return np.sqrt(edges[:-1] * edges[1:]), mean


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [dead_leaves.render(i, 128, 3) for i in range(12)]


def test_each_image_depends_only_on_seed_and_index():
    five = [dead_leaves.render(i, 64, 7) for i in range(5)]
    assert np.array_equal(five[3], dead_leaves.render(3, size=64, seed=7))
    assert not np.array_equal(five[3], five[4])
    assert not np.array_equal(five[3], dead_leaves.render(3, size=64, seed=8))


def test_shape_dtype_and_odd_sizes():
    for size in (64, 50):
        image = dead_leaves.render(0, size=size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_supersampling_draws_the_same_leaves_with_softer_edges(monkeypatch):
    sharp = dead_leaves.render(2, size=96)
    monkeypatch.setattr(dead_leaves, "SUPERSAMPLE", 2)
    monkeypatch.setattr(dead_leaves, "TILE", 4)
    smooth = dead_leaves.render(2, size=96)
    assert smooth.shape == sharp.shape and smooth.dtype == np.uint8
    assert np.mean(np.abs(smooth.astype(int) - sharp)) < 20  # the same scene…
    colours = [len(np.unique(image.reshape(-1, 3), axis=0)) for image in (sharp, smooth)]
    assert colours[1] > colours[0]  # …with blended edge pixels


def test_skipping_hidden_leaves_never_changes_the_image(monkeypatch):
    # Coarser tiles keep more leaves; a correct cull only ever drops invisible ones.
    fine = [dead_leaves.render(i, size=96, seed=1) for i in range(4)]
    monkeypatch.setattr(dead_leaves, "TILE", 16)
    for i, image in enumerate(fine):
        assert np.array_equal(image, dead_leaves.render(i, size=96, seed=1))


def test_leaves_cover_the_whole_canvas(images):
    # An open pixel would show the empty layer's black; leaf colours are never (0, 0, 0).
    for image in images:
        assert not (image == 0).all(axis=2).any()


def test_a_flat_leaf_fills_what_the_rounds_leave_open(monkeypatch):
    monkeypatch.setattr(dead_leaves, "ROUND_COVERAGE", (0.5,))  # half a layer: ~60% stays open
    image = dead_leaves.render(0, size=64)
    assert not (image == 0).all(axis=2).any()
    counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)[1]
    assert counts.max() > 0.4 * 64 * 64


def test_radii_follow_the_inverse_cube_law():
    rng = np.random.default_rng(0)
    r = dead_leaves.leaf_radii(rng, 200_000, 2.0, 100.0)
    assert r.min() >= 2.0 and r.max() <= 100.0
    # P(r > 2 r_min) = ((2 r_min)^-2 - r_max^-2) / (r_min^-2 - r_max^-2) ≈ 1/4 under r^-3.
    expected = (4.0**-2 - 100.0**-2) / (2.0**-2 - 100.0**-2)
    assert abs(np.mean(r > 4.0) - expected) < 0.005
    area = np.mean(np.pi * r**2)
    assert dead_leaves.mean_leaf_area(2.0, 100.0) == pytest.approx(area, rel=0.02)


def test_power_spectrum_falls_as_one_over_f_squared(images):
    f, power = radial_power(images)
    slope = np.polyfit(np.log(f), np.log(power), 1)[0]
    assert -3.0 <= slope <= -1.5, slope


def test_white_noise_fails_the_spectrum_check():
    # The slope check can fail: flat noise has slope ≈ 0.
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(4)]
    f, power = radial_power(noise)
    assert np.polyfit(np.log(f), np.log(power), 1)[0] > -0.5


def test_sharp_edges_and_variety(images):
    for image in images:
        gray = luma(image)
        step = np.abs(np.diff(gray, axis=1))
        assert np.mean(step > 0.1) > 0.01  # occluding edges, not smooth shading
        assert np.mean(step < 1e-6) > 0.3  # flat leaf interiors between them
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100
        assert gray.std() > 0.05
    means = [luma(image).mean() for image in images]
    assert np.std(means) > 0.01  # images differ from one another
