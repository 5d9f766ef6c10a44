"""src/filtering.py: orientation, padding, agreement with SciPy and with a real Keras Conv2D."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage, signal

from src import filtering, kernels
from src.stack import Stack, write_stack

SOBEL_X = kernels.make("sobel_x")
RNG = np.random.default_rng(1234)
IMAGES = RNG.random((3, 40, 36)).astype(np.float32)
ASYMMETRIC = {  # no symmetry, so any flip or one-pixel shift shows
    (kh, kw): RNG.standard_normal((kh, kw)) / np.sqrt(kh * kw)
    for kh, kw in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (2, 5), (7, 7), (32, 32)]
}


def step_image(height: int = 8, width: int = 8) -> np.ndarray:
    """Dark on the left, bright on the right."""
    img = np.zeros((1, height, width), dtype=np.float32)
    img[:, :, width // 2 :] = 1.0
    return img


def by_definition(images, k, a, b):
    """What a Conv2D computes at output pixel (a, b): sum of k * the patch under it."""
    kh, kw = k.shape
    return (images[:, a : a + kh, b : b + kw].astype(np.float64) * k).sum(axis=(1, 2))


# --- conv2d_kernel and same_padding ----------------------------------------------


def test_conv2d_kernel_is_the_kernel_for_correlate_and_flipped_for_convolve():
    k = ASYMMETRIC[(5, 4)]
    np.testing.assert_array_equal(filtering.conv2d_kernel(k, "correlate"), k)
    np.testing.assert_array_equal(filtering.conv2d_kernel(k, "convolve"), k[::-1, ::-1])
    np.testing.assert_array_equal(
        filtering.conv2d_kernel(kernels.EDGE, "convolve"), [[1, 1], [-1, -1]]
    )


def test_conv2d_kernel_returns_a_copy():
    k = SOBEL_X.copy()
    for op in ("correlate", "convolve"):
        filtering.conv2d_kernel(k, op)[0, 0] = 99
    np.testing.assert_array_equal(k, SOBEL_X)


def test_conv2d_kernel_rejects_unknown_operation():
    with pytest.raises(ValueError, match="operation"):
        filtering.conv2d_kernel(SOBEL_X, "deconvolve")


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((1, 1), ((0, 0), (0, 0))),
        ((2, 2), ((0, 1), (0, 1))),
        ((3, 3), ((1, 1), (1, 1))),
        ((4, 5), ((1, 2), (2, 2))),
        ((32, 32), ((15, 16), (15, 16))),
    ],
)
def test_same_padding_puts_the_odd_pixel_after(shape, expected):
    assert filtering.same_padding(*shape) == expected


# --- orientation: the course notes' correlation vs convolution -------------------


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_sobel_x_correlated_with_a_rising_step_is_positive(method):
    out = filtering.correlate(step_image(), SOBEL_X, "valid", method=method)
    assert out.max() == pytest.approx(4.0, abs=1e-5)
    assert out.min() > -1e-5


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_sobel_x_convolved_with_a_rising_step_is_negative(method):
    conv = filtering.conv2d_kernel(SOBEL_X, "convolve")
    out = filtering.correlate(step_image(), conv, "valid", method=method)
    assert out.min() == pytest.approx(-4.0, abs=1e-5)
    assert out.max() < 1e-5
    np.testing.assert_allclose(
        out[0], signal.convolve2d(step_image()[0], SOBEL_X, "valid"), atol=1e-5
    )


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 4), (32, 32)])
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_each_output_pixel_is_the_sum_of_kernel_times_patch(shape, method):
    k = ASYMMETRIC[shape]
    out = filtering.correlate(IMAGES, k, "valid", method=method)
    for a, b in [(0, 0), (3, 1), (out.shape[1] - 1, out.shape[2] - 1)]:
        np.testing.assert_allclose(out[:, a, b], by_definition(IMAGES, k, a, b), atol=1e-5)


def test_the_course_notes_2x2_example_changes_sign():
    img = IMAGES[:1]
    f1 = kernels.EDGE
    convolved = signal.convolve2d(img[0], f1, mode="valid")
    correlated = filtering.correlate(img, f1, "valid")[0]
    assert correlated[0, 0] == pytest.approx((img[0, :2, :2] * f1).sum(), abs=1e-6)
    assert correlated[0, 0] == pytest.approx(-convolved[0, 0], abs=1e-6)


# --- agreement with SciPy ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 4), (2, 5), (32, 32)])
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_correlate_valid_equals_scipy_correlate_interior(shape, method):
    k = ASYMMETRIC[shape]
    kh, kw = shape
    out = filtering.correlate(IMAGES, k, "valid", method=method)
    for i, img in enumerate(IMAGES.astype(np.float64)):
        full = ndimage.correlate(img, k, mode="constant")
        interior = full[
            kh // 2 : kh // 2 + img.shape[0] - kh + 1, kw // 2 : kw // 2 + img.shape[1] - kw + 1
        ]
        np.testing.assert_allclose(out[i], interior, atol=1e-5)
        np.testing.assert_allclose(out[i], signal.correlate2d(img, k, "valid"), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 4), (32, 32)])
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_convolve_valid_equals_scipy_convolve2d(shape, method):
    k = ASYMMETRIC[shape]
    out = filtering.correlate(
        IMAGES, filtering.conv2d_kernel(k, "convolve"), "valid", method=method
    )
    for i, img in enumerate(IMAGES.astype(np.float64)):
        np.testing.assert_allclose(out[i], signal.convolve2d(img, k, mode="valid"), atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (7, 7)])
def test_convolve_same_equals_scipy_convolve2d_for_odd_kernels(shape):
    k = RNG.standard_normal(shape)
    out = filtering.correlate(IMAGES, filtering.conv2d_kernel(k, "convolve"), "same")
    for i, img in enumerate(IMAGES.astype(np.float64)):
        np.testing.assert_allclose(out[i], signal.convolve2d(img, k, mode="same"), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 4), (32, 32)])
def test_valid_shape(shape):
    out = filtering.correlate(IMAGES, ASYMMETRIC[shape], "valid")
    assert out.shape == (3, 40 - shape[0] + 1, 36 - shape[1] + 1)
    assert out.dtype == np.float32
    assert filtering.output_shape(40, 36, shape, "valid") == out.shape[1:]


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (4, 4), (5, 4), (32, 32)])
def test_same_shape(shape):
    out = filtering.correlate(IMAGES, ASYMMETRIC[shape], "same")
    assert out.shape == IMAGES.shape and out.dtype == np.float32
    assert filtering.output_shape(40, 36, shape, "same") == (40, 36)


def test_kernel_as_large_as_the_image_gives_one_pixel():
    img = IMAGES[:, :32, :32]
    out = filtering.correlate(img, ASYMMETRIC[(32, 32)], "valid")
    assert out.shape == (3, 1, 1)
    np.testing.assert_allclose(
        out[:, 0, 0], by_definition(img, ASYMMETRIC[(32, 32)], 0, 0), atol=1e-5
    )


# --- direct vs FFT -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 4), (7, 7), (32, 32)])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_fft_equals_direct(shape, padding):
    k = ASYMMETRIC[shape]
    direct = filtering.correlate(IMAGES, k, padding, method="direct")
    fft = filtering.correlate(IMAGES, k, padding, method="fft")
    np.testing.assert_allclose(fft, direct, atol=1e-5)


@pytest.mark.parametrize(
    "shape,uses_fft", [((3, 3), False), ((7, 7), False), ((8, 8), True), ((32, 32), True)]
)
def test_auto_picks_fft_only_for_large_kernels(monkeypatch, shape, uses_fft):
    calls = []
    real = filtering.fft.irfft2
    monkeypatch.setattr(filtering.fft, "irfft2", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    filtering.correlate(IMAGES, RNG.standard_normal(shape), "valid")
    assert bool(calls) == uses_fft


# --- a real Keras Conv2D -------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    return keras


def keras_conv2d(keras, images, k, padding):
    layer = keras.layers.Conv2D(1, k.shape, padding=padding, use_bias=False)
    layer.build((None, images.shape[1], images.shape[2], 1))
    layer.set_weights([k[:, :, None, None].astype(np.float32)])
    return np.asarray(layer(images[..., None]))[..., 0]


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (2, 5), (32, 32)])
def test_matches_a_keras_conv2d(keras, shape, padding):
    k = ASYMMETRIC[shape]
    ours = filtering.correlate(IMAGES, k.astype(np.float32), padding)
    theirs = keras_conv2d(keras, IMAGES, k, padding)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_keras_learns_the_flipped_kernel_for_convolve(keras):
    # the convolve target is what a Conv2D holding conv2d_kernel(k, "convolve") outputs
    k = ASYMMETRIC[(4, 4)]
    target = np.stack([signal.convolve2d(img, k, mode="valid") for img in IMAGES])
    theirs = keras_conv2d(keras, IMAGES, filtering.conv2d_kernel(k, "convolve"), "valid")
    np.testing.assert_allclose(theirs, target, atol=1e-5)


# --- input checks ---------------------------------------------------------------------


def test_accepts_float64_and_integer_images():
    ints = (IMAGES * 255).astype(np.uint8)
    out = filtering.correlate(ints, SOBEL_X, "valid")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, filtering.correlate(ints.astype(np.float64), SOBEL_X, "valid"))


@pytest.mark.parametrize(
    "images,k,padding,method,match",
    [
        (IMAGES[0], SOBEL_X, "valid", "auto", "N, H, W"),
        (IMAGES, SOBEL_X[None], "valid", "auto", "bank"),
        (IMAGES, SOBEL_X, "full", "auto", "padding"),
        (IMAGES, SOBEL_X, "valid", "winograd", "method"),
        (IMAGES[:, :20, :20], np.ones((21, 3)), "valid", "auto", "does not fit"),
    ],
)
def test_bad_arguments_raise(images, k, padding, method, match):
    with pytest.raises(ValueError, match=match):
        filtering.correlate(images, k, padding, method=method)


# --- noise and chunking ----------------------------------------------------------------


def test_noise_is_seeded():
    targets = filtering.correlate(IMAGES, SOBEL_X, "valid")
    a = filtering.add_noise(targets, 0.1, np.random.default_rng(7))
    b = filtering.add_noise(targets, 0.1, np.random.default_rng(7))
    c = filtering.add_noise(targets, 0.1, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_noise_has_the_asked_std_and_zero_mean():
    targets = np.zeros((4, 100, 100), dtype=np.float32)
    noisy = filtering.add_noise(targets, 0.25, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == targets.shape
    assert noisy.std() == pytest.approx(0.25, rel=0.02)
    assert abs(noisy.mean()) < 0.01


def test_zero_noise_changes_nothing():
    targets = filtering.correlate(IMAGES, SOBEL_X, "valid")
    np.testing.assert_array_equal(
        filtering.add_noise(targets, 0.0, np.random.default_rng(0)), targets
    )
    with pytest.raises(ValueError):
        filtering.add_noise(targets, -0.1, np.random.default_rng(0))


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_chunking_does_not_change_the_targets(noise_std, padding):
    images = RNG.random((7, 20, 20)).astype(np.float32)
    k = ASYMMETRIC[(4, 4)]
    results = []
    for chunk in (1, 3, 7, 64):
        targets = np.stack(
            list(
                filtering.make_targets(
                    images,
                    k,
                    padding,
                    noise_std=noise_std,
                    rng=np.random.default_rng(5),
                    chunk=chunk,
                )
            )
        )
        assert targets.shape == (7, *filtering.output_shape(20, 20, k.shape, padding))
        results.append(targets)
    for targets in results:
        assert np.all(np.isfinite(targets))
        np.testing.assert_array_equal(targets, results[0])
    if noise_std == 0:
        np.testing.assert_array_equal(results[0], filtering.correlate(images, k, padding))


class Recorded:
    """A stack that notes which rows it is asked for."""

    def __init__(self, stack):
        self.stack, self.keys = stack, []

    def __len__(self):
        return len(self.stack)

    @property
    def shape(self):
        return self.stack.shape

    def __getitem__(self, key):
        self.keys.append(key)
        return self.stack[key]


def test_make_targets_streams_from_stack_to_stack(tmp_path):
    images = RNG.random((5, 40, 40)).astype(np.float32)
    write_stack(tmp_path / "images.npy", iter(images), 5, (40, 40))
    k = kernels.make("smiley")
    with Stack(tmp_path / "images.npy") as stack:
        recorded = Recorded(stack)
        targets = filtering.make_targets(recorded, k, "valid", chunk=2)
        assert write_stack(tmp_path / "targets.npy", targets, 5, (9, 9)) == 5
    assert recorded.keys == [slice(0, 2), slice(2, 4), slice(4, 6)]  # one chunk at a time
    np.testing.assert_allclose(
        np.load(tmp_path / "targets.npy"), filtering.correlate(images, k, "valid"), atol=0
    )


def test_make_targets_needs_an_rng_for_noise():
    with pytest.raises(ValueError, match="rng"):
        next(filtering.make_targets(IMAGES, SOBEL_X, "valid", noise_std=0.1))


# --- banks, colour, activations, non-linear filters, rescale (issues 18, 19) ----------

COLOUR = RNG.random((2, 30, 28, 3)).astype(np.float32)


def test_a_bank_sums_over_channels_one_target_channel_per_filter():
    bank = RNG.standard_normal((3, 3, 3, 2))
    targets = filtering.correlate(COLOUR, bank, "valid")
    assert targets.shape == (2, 28, 26, 2) and targets.dtype == np.float32
    for f in range(2):
        expected = sum(
            signal.correlate2d(COLOUR[1, :, :, c].astype(np.float64), bank[:, :, c, f], "valid")
            for c in range(3)
        )
        np.testing.assert_allclose(targets[1, ..., f], expected, atol=1e-5)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_fft_equals_direct_for_a_colour_bank(padding):
    bank = RNG.standard_normal((9, 9, 3, 2))
    direct = filtering.correlate_bank(COLOUR, bank, padding, method="direct")
    fft = filtering.correlate_bank(COLOUR, bank, padding, method="fft")
    np.testing.assert_allclose(fft, direct, atol=1e-11)


@pytest.mark.parametrize("activation", filtering.ACTIVATIONS)
def test_predict_applies_bias_then_activation(activation):
    bank = RNG.standard_normal((3, 3, 3, 2))
    out = filtering.predict(COLOUR, bank, [0.5, -0.25], "same", activation)
    pre = filtering.correlate_bank(COLOUR, bank, "same") + np.array([0.5, -0.25])
    expected = {
        "linear": pre,
        "relu": np.maximum(pre, 0),
        "sigmoid": 1 / (1 + np.exp(-pre)),
        "tanh": np.tanh(pre),
    }[activation]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_sigmoid_saturates_without_warnings():
    x = np.array([-1000.0, 0.0, 1000.0])
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(filtering.activate(x, "sigmoid"), [0.0, 0.5, 1.0])


def test_the_non_linear_filters_are_what_they_say():
    from src.config import KernelSettings

    images = RNG.random((2, 20, 20, 1))
    settings = KernelSettings()
    median = filtering.nonlinear("median", settings)(images)
    np.testing.assert_array_equal(
        median[0, ..., 0], ndimage.median_filter(images[0, ..., 0], size=5, mode="constant")
    )
    dilated = filtering.nonlinear("max", settings)(images)
    assert dilated[0, 5, 5, 0] == images[0, 4:7, 4:7, 0].max()
    eroded = filtering.nonlinear("min", settings)(images)
    assert eroded[0, 5, 5, 0] == images[0, 4:7, 4:7, 0].min()
    sx = signal.correlate2d(images[0, ..., 0], SOBEL_X, "same")
    sy = signal.correlate2d(images[0, ..., 0], SOBEL_X.T, "same")
    absolute = filtering.nonlinear("abs_sobel_x", settings)(images)
    np.testing.assert_allclose(absolute[0, ..., 0], np.abs(sx), atol=1e-12)
    magnitude = filtering.nonlinear("gradient_magnitude", settings)(images)
    np.testing.assert_allclose(magnitude[0, ..., 0], np.hypot(sx, sy), atol=1e-12)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("rescale", [2, 4])
def test_rescaled_targets_are_centred_where_the_coarse_conv2d_window_is(padding, rescale):
    # A delta off the centre, one fine pixel right: the target is the fine image moved one
    # fine pixel, then reduced; its centre is where the coarse 3×3 layer's window is.
    fine = RNG.random((2, 12 * rescale, 12 * rescale, 1))
    k = np.zeros((3, 3, 1, 1))
    k[1, 2] = 1.0
    made = filtering.Filter(padding, conv_kernel=k, rescale=rescale)
    inputs, targets = made(fine)
    assert inputs.shape == (2, 12, 12, 1)
    shifted = np.zeros_like(fine)
    shifted[:, :, :-1] = fine[:, :, 1:]
    expected = shifted.reshape(2, 12, rescale, 12, rescale, 1).mean(axis=(2, 4))
    if padding == "valid":
        expected = expected[:, 1:-1, 1:-1]
    assert targets.shape == (2, *made.target_shape(12, 12), 1)
    np.testing.assert_allclose(targets, expected, atol=1e-12)


def test_make_pairs_does_not_depend_on_the_block_size():
    bank = RNG.standard_normal((5, 5, 3, 2))
    made = filtering.Filter("valid", conv_kernel=bank, activation="tanh")
    runs = [
        list(
            filtering.make_pairs(
                COLOUR.repeat(3, axis=0), made, noise_std=0.1, rng=np.random.default_rng(7), chunk=c
            )
        )
        for c in (1, 4, None)
    ]
    for pairs in runs[1:]:
        for (x0, y0), (x1, y1) in zip(runs[0], pairs):
            np.testing.assert_array_equal(x0, x1)
            np.testing.assert_array_equal(y0, y1)


def test_blocks_stay_within_their_memory_budget():
    assert filtering.chunk_size(256, 256, 1, 1) == filtering.CHUNK_MAX
    assert filtering.chunk_size(4096, 4096, 1, 1) == 1
    assert filtering.chunk_size(1024, 1024, 3, 4) * 8 * 1024**2 * 19 <= filtering.BLOCK_BYTES
