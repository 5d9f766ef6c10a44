"""src/figures.py on tiny synthetic arrays: what each figure holds, and that it fits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import AxesImage
from PIL import Image, ImageSequence

from src import figures, kernels

SOBEL = kernels.SOBEL_X
SOBEL_RANGE = (-2.0, 2.0)
DARKEST_RED = tuple(np.round(np.array(colormaps["RdBu_r"](1.0)[:3]) * 255).astype(np.uint8))


def panels(fig):
    """The plotting axes, without the colour bars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def colour_bars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def image(ax) -> AxesImage:
    (found,) = [a for a in ax.get_images()]
    return found


def assert_fits(fig):
    """Everything drawn lies inside the figure: no clipped titles, labels or colour bars."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    drawn = fig.get_tightbbox(renderer)
    size = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01
    assert drawn.x1 <= size[0] + 0.01 and drawn.y1 <= size[1] + 0.01


def converging(true: np.ndarray, snapshots: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Kernels t·true for t rising to 1 at the last snapshot, at log-spaced steps from 0
    (1000 steps an epoch), and their steps table as metrics/steps.csv holds it."""
    t = np.linspace(0.2, 1.0, snapshots)[:, None, None]
    stack = t * true
    step = np.concatenate([[0], np.round(np.geomspace(10, 1e5, snapshots - 1)).astype(int)])
    rel = np.sum((stack - true) ** 2, axis=(1, 2)) / np.sum(true**2)
    table = pd.DataFrame(
        {
            "step": step,
            "epoch": np.where(step == 0, 0, (step - 1) // 1000 + 1),
            "kernel_mse": np.mean((stack - true) ** 2, axis=(1, 2)),
            "kernel_rel_error": rel,
        }
    )
    return stack, table


def read_gif(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


# --- the animation --------------------------------------------------------------


def test_frame_indices_keeps_every_snapshot_up_to_the_limit():
    np.testing.assert_array_equal(figures.frame_indices(1), [0])
    np.testing.assert_array_equal(figures.frame_indices(8), np.arange(8))
    np.testing.assert_array_equal(figures.frame_indices(60), np.arange(60))


def test_frame_indices_subsamples_evenly_keeping_first_and_last():
    picked = figures.frame_indices(1000)
    assert len(picked) == figures.MAX_FRAMES
    assert picked[0] == 0 and picked[-1] == 999
    assert np.all(np.diff(picked) > 0)
    assert len(figures.frame_indices(61)) == figures.MAX_FRAMES


def test_one_distinct_frame_per_snapshot_first_at_step_0(tmp_path):
    stack, steps = converging(SOBEL, 6)
    frames, shown = figures.convergence_frames(stack, steps, SOBEL)
    np.testing.assert_array_equal(shown, steps.step)
    assert shown[0] == 0
    assert len(frames) == 6
    assert {f.shape for f in frames} == {frames[0].shape} and frames[0].dtype == np.uint8
    assert frames[0].shape[2] == 3

    path = tmp_path / "convergence.gif"
    figures.write_gif(frames, path)
    back = read_gif(path)
    assert len(back) == 6
    assert {f.shape for f in back} == {frames[0].shape}
    for i in range(len(back)):
        for j in range(i):
            assert not np.array_equal(back[i], back[j]), f"frames {j} and {i} are the same"
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert durations[-1] > durations[0]  # the converged kernel is held


def test_frames_are_labelled_with_step_epoch_and_error():
    assert figures.step_label(0, 0, 0.51) == (
        "learned, step 0 (initial weights)\nkernel_rel_error 5.1e-01"
    )
    assert (
        figures.step_label(12, 1, 0.034) == "learned, step 12 (epoch 1)\nkernel_rel_error 3.4e-02"
    )


def test_the_label_is_the_only_difference_between_equal_kernels():
    """Two snapshots of one kernel differ only in the learned panel's title."""
    stack = np.stack([SOBEL, SOBEL])
    steps = {"step": [0, 100], "epoch": [0, 4], "kernel_rel_error": [0.0, 0.0]}
    first, second = figures.convergence_frames(stack, steps, SOBEL)[0]
    rows, columns = np.nonzero(np.any(first != second, axis=-1))
    assert len(rows) and rows.max() < first.shape[0] * 0.2  # in the title band at the top
    assert columns.max() < first.shape[1] * 0.5  # over the learned panel


def test_many_snapshots_are_subsampled_with_first_and_last_kept(tmp_path):
    stack, steps = converging(SOBEL, 25)
    frames, shown = figures.convergence_frames(stack, steps, SOBEL, max_frames=10)
    assert len(frames) == 10 and shown[0] == 0 and shown[-1] == steps.step.iloc[-1]
    figures.write_gif(frames, tmp_path / "k.gif")
    with Image.open(tmp_path / "k.gif") as gif:
        assert gif.n_frames == 10


def test_frames_share_one_fixed_colour_range():
    """±max|true|, every frame: a learned weight of 0.4 is pale and only 2.0 is darkest red.
    Autoscaling each frame would paint the largest weight darkest red in every frame."""
    stack, steps = converging(SOBEL, 3)
    frames, _ = figures.convergence_frames(stack, steps, SOBEL)

    def darkest_red(frame):
        return int(np.all(frame == DARKEST_RED, axis=-1).sum())

    first, last = darkest_red(frames[0]), darkest_red(frames[-1])
    assert first > 0  # the true kernel's +2 cells and the colour bar's top
    assert last > 1.5 * first  # at the end the learned +2 cells join them


def test_large_kernel_frames_and_a_small_gif(tmp_path):
    """40 snapshots of a 32×32 kernel: 40 frames, and a GIF of a few hundred KB at most.
    The kernel moves a little between snapshots, as under gradient descent."""
    smiley = kernels.smiley()
    _, steps = converging(smiley, 40)
    start = np.random.default_rng(0).normal(0, 0.03, smiley.shape)
    stack = smiley + start * np.exp(-np.linspace(0, 5, 40))[:, None, None]
    frames, shown = figures.convergence_frames(stack, steps, smiley)
    assert len(frames) == 40 and shown[-1] == 100_000
    figures.write_gif(frames, tmp_path / "smiley.gif")
    assert (tmp_path / "smiley.gif").stat().st_size < 300_000


def test_convergence_rejects_mismatched_inputs():
    steps = {"step": [0, 1], "epoch": [0, 1], "kernel_rel_error": [1, 1]}
    with pytest.raises(ValueError, match="kernels must be"):
        figures.convergence_frames(np.zeros((2, 5, 5)), steps, SOBEL)
    with pytest.raises(ValueError, match="1 rows of steps for 2 kernel snapshots"):
        figures.convergence_frames(np.zeros((2, 3, 3)), {k: v[:1] for k, v in steps.items()}, SOBEL)


# --- learned vs true ----------------------------------------------------------------


def test_comparison_of_a_3x3_kernel():
    learned = SOBEL + 0.01
    fig = figures.comparison(learned, SOBEL, rel_error=1.2e-3, biases=[-2e-4])
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "true kernel",
        "learned kernel",
        "learned − true",
    ]
    assert [bar.get_ylabel() for bar in colour_bars(fig)] == ["weight", "difference"]
    assert image(axes[0]).get_clim() == image(axes[1]).get_clim() == (-2.01, 2.01)
    assert image(axes[2]).get_clim() == pytest.approx((-0.01, 0.01))
    for ax in axes:
        assert len(ax.texts) == 9
        assert ax.get_xlabel() == "column" and ax.get_ylabel() == "row"
    truth_labels = {t.get_text(): t.get_color() for t in axes[0].texts}
    assert truth_labels["2.00"] == "white" and truth_labels["0"] == "black"  # readable contrast
    assert [t.get_text() for t in axes[2].texts] == ["0.0100"] * 9
    assert "1.20e-03" in fig._suptitle.get_text() and "bias -2.0e-04" in fig._suptitle.get_text()
    assert_fits(fig)


def test_the_closed_form_beside_true_and_learned():
    """true | learned | closed form on one scale; learned − true and closed form − true
    on their own shared one, so the two distances from the truth compare."""
    learned, lstsq = SOBEL + 1e-6, SOBEL - 3e-6
    fig = figures.comparison(learned, SOBEL, lstsq, rel_error=1e-12, lstsq_rel_error=4e-12)
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "true kernel",
        "learned kernel",
        "closed-form",
        "learned − true",
        "closed form − true",
    ]
    assert image(axes[0]).get_clim() == image(axes[2]).get_clim()
    assert image(axes[3]).get_clim() == image(axes[4]).get_clim() == pytest.approx((-3e-6, 3e-6))
    assert "closed form 4.00e-12" in fig._suptitle.get_text()
    assert_fits(fig)


def test_no_true_kernel_shows_learned_and_closed_form_on_their_own_range():
    """A median's learned blur (small, positive) on a range that shows it, not ±1."""
    blur = np.full((5, 5), 0.04) + 0.004 * np.random.default_rng(0).normal(size=(5, 5))
    fig = figures.comparison(blur, None, blur + 1e-5, names=["median"])
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "learned kernel",
        "closed-form",
        "learned − closed form",
    ]
    limit = max(np.abs(blur).max(), np.abs(blur + 1e-5).max())
    assert image(axes[0]).get_clim() == pytest.approx((-limit, limit))
    assert "kernel_rel_error" not in fig._suptitle.get_text()
    assert_fits(fig)


def test_a_colour_bank_has_a_row_per_filter_and_channel():
    red = np.stack([np.full((3, 3), 1.5), np.full((3, 3), -1.5), np.full((3, 3), -1.5)], -1)
    bank = np.stack([red, red[..., ::-1]], -1)  # (3, 3, 3, 2)
    errors = {"red": 1e-4, "blue": 2e-4}
    fig = figures.comparison(bank * 1.01, bank, names=["red", "blue"], filter_errors=errors)
    axes = panels(fig)
    assert len(axes) == 6 * 3  # (2 filters × 3 channels) rows of true | learned | difference
    assert [axes[3 * r].get_ylabel() for r in range(6)] == [
        "red R\nkernel_rel_error 1.0e-04",
        "red G",
        "red B",
        "blue R\nkernel_rel_error 2.0e-04",
        "blue G",
        "blue B",
    ]
    assert image(axes[0]).get_clim() == image(axes[3]).get_clim()  # one range for R, G, B
    assert "3 channels, a bank of 2" in fig._suptitle.get_text()
    assert_fits(fig)


def test_a_tiny_difference_fills_its_own_scale():
    """3e-8 on the kernels' ±2 scale would be white; on its own it spans the colour map."""
    difference = 3e-8 * np.random.default_rng(3).normal(size=SOBEL.shape)
    fig = figures.comparison(SOBEL + difference, SOBEL)
    ax_true, ax_learned, ax_difference = panels(fig)
    largest = np.abs(difference).max()
    low, high = image(ax_difference).get_clim()
    assert low == pytest.approx(-largest, rel=1e-6) and high == pytest.approx(largest, rel=1e-6)
    assert image(ax_true).get_clim() == image(ax_learned).get_clim()
    assert image(ax_true).get_clim() == pytest.approx((-2.0, 2.0))
    assert f"{largest:.1e}" in ax_difference.get_title()
    labels = [t.get_text() for t in ax_difference.texts]
    assert all("e-0" in label for label in labels)  # not rounded to 0
    assert colour_bars(fig)[1].get_ylabel() == "difference"
    assert_fits(fig)


def test_an_exact_kernel_has_a_zero_difference_on_a_unit_scale():
    fig = figures.comparison(SOBEL.copy(), SOBEL)
    ax_difference = panels(fig)[2]
    assert image(ax_difference).get_clim() == (-1.0, 1.0)
    assert {t.get_text() for t in ax_difference.texts} == {"0"}


@pytest.mark.parametrize("shape, labels", [((5, 5), 25), ((5, 2), 10), ((6, 6), 0), ((32, 32), 0)])
def test_comparison_writes_values_only_in_small_kernels(shape, labels):
    true = np.random.default_rng(1).normal(size=shape)
    fig = figures.comparison(true * 0.9, true)
    assert [len(ax.texts) for ax in panels(fig)] == [labels] * 3
    assert_fits(fig)


def test_value_format_has_three_significant_digits():
    assert figures.value_format(2.0).format(-1.987) == "-1.99"
    assert figures.value_format(0.162).format(0.0981) == "0.098"
    assert figures.value_format(40.0).format(12.34) == "12.3"
    assert figures.value_format(0.03).format(0.0251) == "0.0251"
    assert figures.value_format(3e-4).format(2.5e-4) == "2.5e-04"
    assert figures.value_format(3e-8).format(-2.5e-8) == "-2.5e-08"


# --- one image through the model ----------------------------------------------------


def test_sample_strip_with_a_colour_original():
    rng = np.random.default_rng(2)
    gray = rng.random((20, 20))
    target = rng.normal(size=(18, 18))
    prediction = target + rng.normal(0, 0.01, target.shape)
    original = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
    fig = figures.sample_strip(gray, target, prediction, original, offset=(1, 1), title="x.png")
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "original",
        "input: grayscale",
        "target: filtered",
        "model prediction",
        "residual: target − prediction",
    ]
    assert len(colour_bars(fig)) == 3  # grayscale, target+prediction, residual
    assert image(axes[2]).get_clim() == image(axes[3]).get_clim()
    low, high = image(axes[4]).get_clim()
    assert low == -high and high == pytest.approx(np.abs(target - prediction).max())
    # the 'valid' target sits inside the input's frame, one pixel in
    assert image(axes[2]).get_extent() == [0.5, 18.5, 18.5, 0.5]
    for ax in axes:
        assert ax.get_xlim() == (-0.5, 19.5) and ax.get_xlabel()
    assert axes[0].get_ylabel()
    assert_fits(fig)


def test_sample_strip_without_an_original_has_four_panels():
    gray = np.linspace(0, 1, 256).reshape(16, 16)
    fig = figures.sample_strip(gray, gray, gray)
    assert len(panels(fig)) == 4
    assert "RMS 0.00e+00" in panels(fig)[3].get_title()
    assert_fits(fig)


# --- curves ----------------------------------------------------------------------

STEPS = {
    "step": [0, 1, 3, 10, 30, 100],
    "epoch": [0, 1, 1, 1, 3, 10],
    "kernel_mse": [0.5, 0.4, 0.2, 0.05, 0.01, 1e-4],
    "kernel_rel_error": [1.0, 0.8, 0.4, 0.1, 0.02, 2e-4],
}


def history_of(epochs: np.ndarray, **extra) -> dict:
    """A metrics/history.csv table in the spec's columns."""
    return {
        "epoch": epochs,
        "steps": epochs * 20,
        "crop_loss": 1.0 / epochs,
        "loss": 1e-3 / epochs,
        "val_loss": 2e-3 / epochs,
        "explained_variance": 1 - 1e-3 / epochs**3,
        "kernel_mse": 0.1 / epochs**2,
        "kernel_rel_error": 0.5 / epochs**2,
        "newton_step": 1e-2 / epochs**4,
        "standard_error": np.full(len(epochs), 1e-6),
        **extra,
    }


FINAL = {
    "lstsq_val_loss": 1.5e-3,
    "lstsq_kernel_rel_error": 1e-9,
    "lstsq_kernel_mse": 1e-10,
    "lstsq_explained_variance": 1 - 1e-5,
    "stop_reason": "noise floor",
}


def reference_lines(ax) -> list:
    return [line for line in ax.lines if line.get_label() == "closed-form least squares"]


def test_curves_per_step_error_and_one_log_panel_per_epoch_metric():
    epochs = np.arange(1, 6)
    fig = figures.curves(history_of(epochs), STEPS, FINAL)
    axes = panels(fig)
    assert [ax.get_ylabel() for ax in axes] == [
        "kernel_rel_error",
        "kernel_rel_error",
        "kernel_mse",
        "mean squared error",
        "1 − R²",
        "crop_loss",
        "newton_step",
    ]
    assert all(ax.get_yscale() == "log" for ax in axes)
    by_step, per_epoch = axes[0], axes[1:]
    assert by_step.get_xscale() == "symlog" and "step" in by_step.get_xlabel()
    np.testing.assert_array_equal(by_step.lines[0].get_xdata(), STEPS["step"])
    assert by_step.get_xlim()[0] <= 0  # step 0, the initial weights, is on the axis
    assert [ax.get_xlabel() for ax in per_epoch] == ["epoch"] * 6
    np.testing.assert_array_equal(per_epoch[0].lines[0].get_xdata(), epochs)
    assert [line.get_label() for line in per_epoch[2].lines[:2]] == ["loss", "val_loss"]
    np.testing.assert_allclose(per_epoch[3].lines[0].get_ydata(), 1e-3 / epochs**3)  # 1 − R²
    assert "100 optimizer steps" in fig._suptitle.get_text()
    assert "noise floor" in fig._suptitle.get_text()
    assert_fits(fig)


def test_the_closed_form_is_a_dashed_reference_line_with_a_legend():
    fig = figures.curves(history_of(np.arange(1, 4)), STEPS, FINAL)
    by_step, rel, mse, loss, unexplained = panels(fig)[:5]
    for ax, value in (
        (by_step, 1e-9),
        (rel, 1e-9),
        (mse, 1e-10),
        (loss, 1.5e-3),
        (unexplained, 1e-5),
    ):
        (line,) = reference_lines(ax)
        assert line.get_linestyle() == "--"
        assert line.get_ydata()[0] == pytest.approx(value)
        assert "closed-form least squares" in [t.get_text() for t in ax.get_legend().texts]


def test_a_bank_has_a_curve_per_filter():
    epochs = np.arange(1, 4)
    history = history_of(
        epochs, **{"kernel_rel_error/sobel_x": 1 / epochs, "kernel_rel_error/smiley": 2 / epochs}
    )
    steps = {**STEPS, "kernel_rel_error/sobel_x": STEPS["kernel_rel_error"]}
    steps["kernel_rel_error/smiley"] = [2 * v for v in STEPS["kernel_rel_error"]]
    fig = figures.curves(history, steps)
    by_step, rel = panels(fig)[:2]
    for ax in (by_step, rel):
        assert [line.get_label() for line in ax.lines] == [
            "kernel_rel_error",
            "kernel_rel_error/sobel_x",
            "kernel_rel_error/smiley",
        ]
        assert ax.get_legend() is not None
    assert_fits(fig)


def test_no_true_kernel_no_kernel_panels():
    """median: no kernel columns in history or steps; R² and the losses are drawn."""
    history = {k: v for k, v in history_of(np.arange(1, 4)).items() if "kernel" not in k}
    steps = {"step": STEPS["step"], "epoch": STEPS["epoch"]}
    fig = figures.curves(history, steps, FINAL)
    assert [ax.get_ylabel() for ax in panels(fig)] == [
        "mean squared error",
        "1 − R²",
        "crop_loss",
        "newton_step",
    ]
    assert reference_lines(panels(fig)[1])
    assert_fits(fig)


def test_curves_without_validation_images():
    history = history_of(np.arange(1, 3), val_loss=[np.nan, np.nan])
    history["explained_variance"] = [np.nan, np.nan]
    fig = figures.curves(history, STEPS)
    unexplained = panels(fig)[4]
    assert not unexplained.lines and "no positive 1 − R²" in unexplained.texts[0].get_text()
    loss = panels(fig)[3]
    assert [line.get_label() for line in loss.lines] == ["loss"]
    assert_fits(fig)


# --- kernel pictures ------------------------------------------------------------


def test_kernel_picture_is_upscaled_rgb():
    assert figures.kernel_picture(np.ones((3, 3)), SOBEL_RANGE).shape == (129, 129, 3)
    assert figures.kernel_picture(np.ones((32, 32)), SOBEL_RANGE).shape == (128, 128, 3)
    picture = figures.kernel_picture(np.ones((3, 3, 1, 1)), SOBEL_RANGE, min_pixels=30)
    assert picture.shape == (30, 30, 3) and picture.dtype == np.uint8


def test_kernel_picture_colours_come_from_the_fixed_range():
    small = figures.kernel_picture(np.array([[0.0, 1.0]]), SOBEL_RANGE, min_pixels=2)
    large = figures.kernel_picture(np.array([[0.0, 50.0]]), SOBEL_RANGE, min_pixels=2)
    top = figures.kernel_picture(np.array([[2.0, -2.0]]), SOBEL_RANGE, min_pixels=2)
    assert (small[0, 0] == large[0, 0]).all()  # zero looks the same, whatever else
    assert (small[0, 0] > 230).all()  # and is near white
    assert (large[0, 1] == top[0, 0]).all()  # above the range is clipped
    assert top[0, 0, 0] > top[0, 0, 2] and top[0, 1, 2] > top[0, 1, 0]  # + red, − blue


def test_kernel_picture_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        figures.kernel_picture(np.ones(3), SOBEL_RANGE)
    with pytest.raises(ValueError, match="value_range"):
        figures.kernel_picture(np.ones((3, 3)), (1.0, 1.0))


def test_symmetric_range():
    assert figures.symmetric_range(np.array([[-1.0, 0.0, 2.0]])) == (-2.0, 2.0)
    assert figures.symmetric_range(np.zeros((3, 3))) == (-1.0, 1.0)


RED = np.stack([np.full((3, 3), 1.5), np.full((3, 3), -1.5), np.full((3, 3), -1.5)], -1)[..., None]


def test_kernel_image_of_one_gray_kernel_has_a_colour_bar():
    picture = figures.kernel_image(SOBEL, value_range=SOBEL_RANGE)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    block = figures.kernel_picture(SOBEL, SOBEL_RANGE, 96)
    top = figures.LABEL_PIXELS
    np.testing.assert_array_equal(pixels[top : top + block.shape[0], : block.shape[1]], block)
    bar = pixels[top : top + block.shape[0], block.shape[1] + figures.GAP + 2]
    assert tuple(bar[0]) == DARKEST_RED  # the bar's top is the range's high end
    assert bar[-1, 2] > bar[-1, 0]  # and its bottom blue


def test_kernel_image_shows_a_colour_kernels_channels_side_by_side():
    gray = figures.kernel_image(RED[:, :, 0, 0], value_range=(-1.5, 1.5))  # its R slice alone
    colour = figures.kernel_image(RED, ["red"], (-1.5, 1.5))
    assert colour.height == gray.height
    assert colour.width > 2.5 * (gray.width - 40)  # three slices and one bar
    pixels = np.asarray(colour)
    row = pixels[figures.LABEL_PIXELS + 10]
    slice_width = 96 + figures.GAP
    r, g = row[10], row[slice_width + 10]
    assert r[0] > r[2] and g[2] > g[0]  # R +1.5 red, G −1.5 blue: one range for all three


def test_kernel_image_of_a_bank_tiles_every_filter():
    bank = np.random.default_rng(0).normal(size=(5, 5, 1, 9))
    one = figures.kernel_image(bank[..., :1], ["a"])
    nine = figures.kernel_image(bank, [f"f{i}" for i in range(9)])
    assert nine.width == pytest.approx(3 * one.width + 2 * figures.GAP, abs=30)
    assert nine.height == 3 * one.height + 2 * figures.GAP


def test_kernel_image_ranges_fixed_per_filter_or_own():
    bank = np.stack([SOBEL, 0.01 * SOBEL], -1)[:, :, None, :]
    own = np.asarray(figures.kernel_image(bank, ["big", "small"]))
    fixed = np.asarray(figures.kernel_image(bank, ["big", "small"], [(-2, 2), (-2, 2)]))
    assert not np.array_equal(own, fixed)  # the small filter fills its own range
    with pytest.raises(ValueError, match="value_range"):
        figures.kernel_image(bank, None, [(-1, 1)] * 3)


def test_frames_of_a_colour_bank_differ_only_in_the_learned_half():
    bank = np.concatenate([RED, np.repeat(SOBEL[:, :, None], 3, axis=2)[..., None]], axis=3)
    stack = np.stack([bank, bank])
    steps = {"step": [0, 100], "epoch": [0, 4], "kernel_rel_error": [0.0, 0.0]}
    first, second = figures.convergence_frames(stack, steps, bank, ["red", "sobel_x"])[0]
    assert first.shape[1] > 560 and first.shape[0] > 200  # six slices a row, two rows
    rows, columns = np.nonzero(np.any(first != second, axis=-1))
    assert len(rows) and columns.max() < first.shape[1] * 0.5


def test_frames_without_a_true_kernel_or_errors():
    """median: no kernel_rel_error column; the learned kernel beside the closed form,
    or alone."""
    blur = np.full((5, 5, 1, 1), 0.04)
    stack = blur[None] * np.linspace(0.1, 1, 4)[:, None, None, None, None]
    steps = {"step": [0, 1, 5, 20], "epoch": [0, 1, 1, 2]}
    with_closed_form, shown = figures.convergence_frames(stack, steps, blur, ["median"], "closed")
    alone, _ = figures.convergence_frames(stack, steps, None, ["median"])
    assert len(with_closed_form) == len(alone) == 4 and list(shown) == [0, 1, 5, 20]
    assert alone[0].shape[1] < with_closed_form[0].shape[1]
    assert figures.step_label(5, 1) == "learned, step 5 (epoch 1)\n "


def test_sample_strip_of_a_colour_bank():
    rng = np.random.default_rng(2)
    colour = rng.random((20, 20, 3))
    target = rng.normal(size=(18, 18, 2))
    fig = figures.sample_strip(colour, target, target * 0.99, names=["red", "blue"])
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes if ax.get_title()] == [
        "input: RGB",
        "target: red",
        "model prediction",
        "residual: target − prediction",
        "target: blue",
        "model prediction",
        "residual: target − prediction",
    ]
    assert len(colour_bars(fig)) == 4  # target+prediction and residual, a row each
    assert_fits(fig)


def test_sample_strip_shows_the_first_filters_of_a_large_bank():
    target = np.zeros((8, 8, 6))
    fig = figures.sample_strip(np.zeros((10, 10)), target, target, names=list("abcdef"))
    assert f"first {figures.MAX_SAMPLE_FILTERS} of 6 filters" in fig._suptitle.get_text()


def test_gallery_shows_colour_kernels_per_channel_and_marks_the_non_linear():
    fig = figures.kernel_gallery(
        {"sobel_x": SOBEL, "red": RED[..., 0], "median": "no kernel: non-linear"}
    )
    titles = [ax.get_title() for ax in panels(fig) if ax.get_title()]
    assert titles == [
        "sobel_x (3×3)",
        "red R (3×3)",
        "red G (3×3)",
        "red B (3×3)",
        "median",
    ]
    red_panels = [ax for ax in panels(fig) if ax.get_title().startswith("red")]
    assert len({image(ax).get_clim() for ax in red_panels}) == 1  # one range
    assert_fits(fig)


def test_kernel_ranges_per_filter_from_the_reference():
    bank = np.stack([SOBEL, 0.5 * SOBEL], -1)[:, :, None, :]
    assert figures.kernel_ranges(bank) == [(-2.0, 2.0), (-1.0, 1.0)]
    assert figures.kernel_ranges(None, 2 * bank) == [(-4.0, 4.0), (-2.0, 2.0)]
    assert figures.kernel_ranges(None) is None  # no reference: each picture its own
    picture = figures.kernel_image(bank, ["a", "b"], figures.kernel_ranges(bank))
    assert picture.height > 2 * figures.kernel_image(bank[..., :1], ["a"]).height - 1
