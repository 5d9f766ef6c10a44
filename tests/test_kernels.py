"""src/kernels.py: exact values, orientation, Gaussian shape, the smiley, kernels from files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from src import config, kernels
from src.config import KernelSettings
from src.errors import UserError

EXACT = {
    "sobel_x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel_y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "prewitt_x": [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]],
    "prewitt_y": [[-1, -1, -1], [0, 0, 0], [1, 1, 1]],
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "edge": [[-1, -1], [1, 1]],
}


def _rotated(std_a: float, std_b: float) -> list[list[float]]:
    """The covariance with these principal standard deviations, its axes at 45°."""
    turn = np.array([[1.0, -1.0], [1.0, 1.0]]) / np.sqrt(2)
    return (turn @ np.diag([std_a**2, std_b**2]) @ turn.T).tolist()


def settings(**doc) -> KernelSettings:
    """The `kernels:` section of params.yaml, validated as config.parse does."""
    return KernelSettings.model_validate(doc)


def one_line_user_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_values(name):
    k = kernels.make(name)
    assert k.dtype == np.float64
    np.testing.assert_array_equal(k, np.array(EXACT[name], dtype=np.float64))


def test_make_returns_a_copy_callers_may_change():
    kernels.make("sobel_x")[0, 0] = 99
    assert kernels.make("sobel_x")[0, 0] == -1


@pytest.mark.parametrize("size", [1, 3, 5])
def test_box_is_the_mean(size):
    k = kernels.make("box", settings(box={"size": size}))
    assert k.shape == (size, size)
    np.testing.assert_allclose(k, 1.0 / size**2)


def test_without_settings_the_defaults_are_used():
    assert kernels.make("box").shape == (5, 5)
    default = settings(gaussian={"size": 7, "sigma": 1.5})
    np.testing.assert_array_equal(kernels.make("gaussian"), kernels.make("gaussian", default))


def test_every_builtin_is_a_finite_float64_gray_or_colour_kernel():
    for name in kernels.NAMES:
        k = kernels.make(name)
        colour = name in kernels.COLOUR
        assert k.ndim == (3 if colour else 2) and k.dtype == np.float64, name
        assert np.all(np.isfinite(k)), name


# --- gaussian ------------------------------------------------------------------


def test_gaussian_matches_the_formula():
    k = kernels.make("gaussian", settings(gaussian={"size": 7, "sigma": 1.5}))
    r = np.arange(7) - 3.0
    expected = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-12)


@pytest.mark.parametrize("size,sigma", [(7, 1.5), (9, 0.8), (6, 2.0)])
def test_gaussian_sums_to_one_and_is_symmetric(size, sigma):
    k = kernels.make("gaussian", settings(gaussian={"size": size, "sigma": sigma}))
    assert k.shape == (size, size)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, :], atol=1e-15)
    np.testing.assert_allclose(k, k[:, ::-1], atol=1e-15)


def test_gaussian_peaks_at_the_centre():
    k = kernels.make("gaussian", settings(gaussian={"size": 7, "sigma": 1.5}))
    assert np.unravel_index(np.argmax(k), k.shape) == (3, 3)
    assert np.all(k[3, 3] > np.delete(k.ravel(), 3 * 7 + 3))


def test_gaussian_with_covariance_is_tilted_like_the_course_notes():
    tilted = settings(gaussian={"size": 7, "covariance": [[1, 0.5], [0.5, 1]]})
    k = kernels.make("gaussian", tilted)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k.T, atol=1e-15)  # sxx == syy
    main, anti = np.diag(k), np.diag(k[:, ::-1])
    assert main.sum() > 1.5 * anti.sum()
    off_centre = [0, 1, 2, 4, 5, 6]
    assert np.all(main[off_centre] > anti[off_centre])
    # an isotropic one has no preferred diagonal
    iso = kernels.make("gaussian", settings(gaussian={"size": 7, "sigma": 1.0}))
    np.testing.assert_allclose(np.diag(iso), np.diag(iso[:, ::-1]), atol=1e-15)


@pytest.mark.parametrize("size", [1, 2, 6, 7, 64])
@pytest.mark.parametrize(
    "gaussian",
    [
        {"sigma": config.SIGMA_MIN},
        {"sigma": config.SIGMA_MAX},
        # the narrowest and widest principal axes config allows, along a diagonal
        {"covariance": _rotated(config.SIGMA_MIN, config.SIGMA_MAX)},
        {"covariance": _rotated(config.SIGMA_MIN, config.SIGMA_MIN)},
    ],
)
def test_gaussians_within_configs_bounds_are_finite_and_sum_to_one(size, gaussian):
    # Outside them an even-sized one is 0/0: size 6 with sigma 0.01 was all NaN.
    k = kernels.make("gaussian", settings(gaussian={"size": size, **gaussian}))
    assert k.shape == (size, size) and np.all(np.isfinite(k)) and k.min() >= 0
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.sum(k.astype(np.float32) ** 2) > np.finfo(np.float32).tiny


def test_a_1x1_gaussian_is_the_identity():
    k = kernels.make("gaussian", settings(gaussian={"size": 1}))
    assert k.dtype == np.float64 and k.tolist() == [[1.0]]


# The range checks of sizes, sigma and covariance are config's: tests/test_config.py.


# --- smiley --------------------------------------------------------------------


def test_smiley_is_32x32_unit_norm_and_nonnegative():
    k = kernels.make("smiley")
    assert k.shape == (32, 32)
    assert np.linalg.norm(k) == pytest.approx(1.0, abs=1e-12)
    assert k.min() >= 0 and k.max() > 0


def test_smiley_is_upright_and_roughly_left_right_symmetric():
    k = kernels.make("smiley")
    norm = np.linalg.norm
    assert norm(k - k[:, ::-1]) < 0.15  # a face mirrors left-right...
    assert norm(k - k[::-1, :]) > 0.3  # ...but not upside down: eyes above the smile
    smile_bottom, its_mirror = k[22:24, 12:20], k[8:10, 12:20]
    assert smile_bottom.mean() > 0.03 and its_mirror.mean() < 0.005


# --- kernels from files ----------------------------------------------------------


def test_file_npy(tmp_path):
    want = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]])
    np.save(tmp_path / "k.npy", want)
    k = kernels.make(f"file:{tmp_path / 'k.npy'}")
    assert k.dtype == np.float64
    np.testing.assert_array_equal(k, want)  # used as given, not normalised


def test_file_npy_integers_become_float64(tmp_path):
    np.save(tmp_path / "k.npy", np.array([[1, 0], [0, -1]], dtype=np.int16))
    k = kernels.from_file(tmp_path / "k.npy")
    assert k.dtype == np.float64
    np.testing.assert_array_equal(k, [[1, 0], [0, -1]])


def test_file_csv(tmp_path):
    (tmp_path / "k.csv").write_text("-1,0,1\n-2,0,2\n-1,0,1\n")
    np.testing.assert_array_equal(kernels.make(f"file:{tmp_path / 'k.csv'}"), EXACT["sobel_x"])


def test_file_csv_single_row_is_2d(tmp_path):
    (tmp_path / "k.csv").write_text("1,2,3\n")
    assert kernels.from_file(tmp_path / "k.csv").shape == (1, 3)


def test_file_png_is_inverted_grayscale_l2_normalised(tmp_path):
    # dark strokes on white, as the original's smiley PNG
    pixels = np.full((4, 5), 255, dtype=np.uint8)
    pixels[1, 2] = 0
    pixels[3, 0] = 153  # 1 - 153/255 = 0.4
    Image.fromarray(pixels).save(tmp_path / "k.png")
    k = kernels.make(f"file:{tmp_path / 'k.png'}")
    expected = np.zeros((4, 5))
    expected[1, 2], expected[3, 0] = 1.0, 0.4
    np.testing.assert_allclose(k, expected / np.linalg.norm(expected), atol=1e-12)
    assert np.linalg.norm(k) == pytest.approx(1.0)


def test_file_rgb_png_reads_as_grayscale(tmp_path):
    rgb = np.full((3, 3, 3), 255, dtype=np.uint8)
    rgb[1, 1] = (0, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "k.png")
    k = kernels.from_file(tmp_path / "k.png")
    assert k.shape == (3, 3) and k[1, 1] == pytest.approx(1.0) and k.sum() == pytest.approx(1.0)


def _write_bad(tmp_path, case):
    path = tmp_path / "k.npy"
    if case == "missing":
        return path
    if case == "empty":
        np.save(path, np.zeros((0, 3)))
    elif case == "3-D":
        np.save(path, np.ones((2, 3, 2)))  # 3-D, but not 3 colour channels
    elif case == "1-D":
        np.save(path, np.ones(3))
    elif case == "nan":
        np.save(path, np.array([[1.0, np.nan], [0.0, 1.0]]))
    elif case == "inf":
        np.save(path, np.array([[1.0, np.inf], [0.0, 1.0]]))
    elif case == "zeros":
        np.save(path, np.zeros((3, 3)))
    elif case == "zeros in float32":
        np.save(path, np.array(EXACT["sobel_x"]) * 1e-300)
    elif case == "norm underflows in float32":
        np.save(path, np.array(EXACT["sobel_x"]) * 1e-25)  # values fit, ‖k‖² = 1.2e-49 does not
    elif case == "inf in float32":
        np.save(path, np.array(EXACT["sobel_x"]) * 1e200)
    elif case == "norm overflows in float32":
        np.save(path, np.array(EXACT["sobel_x"]) * 1e19)
    elif case == "complex":
        np.save(path, np.array(EXACT["sobel_x"]) * (1 + 1j))
    elif case == "complex, zero imaginary part":
        np.save(path, np.array(EXACT["sobel_x"], dtype=np.complex128))
    elif case == "pickle":
        np.save(path, np.array([{"not": "a kernel"}, None], dtype=object), allow_pickle=True)
    elif case == "strings":
        np.save(path, np.array([["a", "b"], ["c", "d"]]))
    elif case == "garbage":
        path.write_bytes(b"not an npy file at all")
    elif case == "bad csv":
        path = tmp_path / "k.csv"
        path.write_text("1,2\nthree,4\n")
    elif case == "bad png":
        path = tmp_path / "k.png"
        path.write_bytes(b"\x89PNG truncated")
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "3-D",
        "1-D",
        "nan",
        "inf",
        "zeros",
        "zeros in float32",
        "norm underflows in float32",
        "inf in float32",
        "norm overflows in float32",
        "complex",
        "complex, zero imaginary part",
        "pickle",
        "strings",
        "garbage",
        "bad csv",
        "bad png",
    ],
)
def test_bad_kernel_files_give_one_line(tmp_path, case):
    path = _write_bad(tmp_path, case)
    with pytest.raises(UserError) as excinfo:
        kernels.make(f"file:{path}")
    message = one_line_user_error(excinfo)
    assert f"file:{path}" in message


@pytest.mark.parametrize("scale", [1e-15, 1e15])
def test_file_kernels_with_a_norm_float32_holds_are_accepted(tmp_path, scale):
    np.save(tmp_path / "k.npy", np.array(EXACT["sobel_x"]) * scale)
    k = kernels.from_file(tmp_path / "k.npy")
    np.testing.assert_array_equal(k, np.array(EXACT["sobel_x"]) * scale)


@pytest.mark.parametrize(
    "values, reason",
    [
        (np.array(EXACT["sobel_x"]) * 1e-300, "its values are out of float32's range"),
        (np.array(EXACT["sobel_x"]) * (1 + 2j), "holds complex numbers"),
    ],
)
def test_a_kernel_float32_or_a_real_array_cannot_hold_is_named(tmp_path, values, reason):
    np.save(tmp_path / "k.npy", values)
    with pytest.raises(UserError) as excinfo:
        kernels.from_file(tmp_path / "k.npy")
    assert reason in one_line_user_error(excinfo)


def test_pickled_file_is_never_unpickled(tmp_path, monkeypatch):
    np.save(tmp_path / "k.npy", np.array([object()], dtype=object), allow_pickle=True)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled a kernel file"))
    with pytest.raises(UserError):
        kernels.from_file(tmp_path / "k.npy")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UserError) as excinfo:
        kernels.make("sobel_z")
    message = one_line_user_error(excinfo)
    assert "sobel_z" in message
    for name in kernels.NAMES:
        assert name in message
    assert "file:" in message


# --- colour, non-linear and banks (issues 18, 19) -------------------------------------


@pytest.mark.parametrize("name, channel", [("red", 0), ("green", 1), ("blue", 2)])
def test_colour_detectors_are_the_course_notes(name, channel):
    k = kernels.make(name)
    expected = -np.ones((3, 3, 3)) * 1.5  # as the notes build them
    expected[:, :, channel] = 1.5
    np.testing.assert_array_equal(k, expected)
    assert kernels.channels(name, KernelSettings()) == 3


def test_a_colour_file_kernel_is_read(tmp_path):
    np.save(tmp_path / "c.npy", np.arange(1.0, 28.0).reshape(3, 3, 3))
    assert kernels.make(f"file:{tmp_path / 'c.npy'}").shape == (3, 3, 3)
    assert kernels.channels(f"file:{tmp_path / 'c.npy'}", KernelSettings()) == 3
    assert kernels.label(f"file:{tmp_path / 'c.npy'}") == "c"


def test_non_linear_filters_have_a_layer_shape_and_no_kernel():
    s = settings(median={"size": 7})
    assert kernels.shape("median", s) == (7, 7) and kernels.shape("max", s) == (3, 3)
    assert kernels.shape("abs_sobel_x", s) == (3, 3)
    assert not kernels.is_linear("gradient_magnitude") and kernels.is_linear("sobel_x")
    with pytest.raises(ValueError, match="no kernel"):
        kernels.make("median")


def test_a_bank_centres_each_kernel_the_odd_row_at_the_bottom_right():
    bank = kernels.bank(("prewitt_x", "edge", "box"), settings(box={"size": 4}))
    assert bank.shape == (4, 4, 1, 3)
    np.testing.assert_array_equal(bank[0:3, 0:3, 0, 0], kernels.PREWITT_X)  # (4-3)//2 = 0
    assert not bank[3, :, 0, 0].any() and not bank[:, 3, 0, 0].any()
    np.testing.assert_array_equal(bank[1:3, 1:3, 0, 1], kernels.EDGE)
    np.testing.assert_array_equal(bank[..., 0, 2], np.full((4, 4), 1 / 16))
