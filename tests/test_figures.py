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
    fig = figures.comparison(SOBEL, learned, rel_error=1.2e-3, bias=-2e-4)
    axes = panels(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "true kernel",
        "learned kernel",
        "learned − true (own scale)",
    ]
    assert len(colour_bars(fig)) == 3  # one on every panel
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


def test_a_tiny_difference_fills_its_own_scale():
    """3e-8 on the kernels' ±2 scale would be white; on its own it spans the colour map."""
    difference = 3e-8 * np.random.default_rng(3).normal(size=SOBEL.shape)
    fig = figures.comparison(SOBEL, SOBEL + difference)
    ax_true, ax_learned, ax_difference = panels(fig)
    largest = np.abs(difference).max()
    low, high = image(ax_difference).get_clim()
    assert low == pytest.approx(-largest, rel=1e-6) and high == pytest.approx(largest, rel=1e-6)
    assert image(ax_true).get_clim() == image(ax_learned).get_clim()
    assert image(ax_true).get_clim() == pytest.approx((-2.0, 2.0))
    assert f"{largest:.1e}" in ax_difference.get_title()
    labels = [t.get_text() for t in ax_difference.texts]
    assert all("e-0" in label for label in labels)  # not rounded to 0
    assert colour_bars(fig)[2].get_ylabel() == "learned − true"
    assert_fits(fig)


def test_an_exact_kernel_has_a_zero_difference_on_a_unit_scale():
    fig = figures.comparison(SOBEL, SOBEL.copy())
    ax_difference = panels(fig)[2]
    assert image(ax_difference).get_clim() == (-1.0, 1.0)
    assert {t.get_text() for t in ax_difference.texts} == {"0"}


@pytest.mark.parametrize("shape, labels", [((5, 5), 25), ((5, 2), 10), ((6, 6), 0), ((32, 32), 0)])
def test_comparison_writes_values_only_in_small_kernels(shape, labels):
    true = np.random.default_rng(1).normal(size=shape)
    fig = figures.comparison(true, true * 0.9)
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


def test_curves_per_step_error_and_one_log_panel_per_epoch_metric():
    epochs = np.arange(1, 6)
    history = {
        "epoch": epochs,
        "loss": 1.0 / epochs,
        "val_loss": 2.0 / epochs,
        "kernel_mse": 0.1 / epochs**2,
        "kernel_rel_error": 0.5 / epochs**2,
    }
    fig = figures.curves(history, STEPS)
    axes = panels(fig)
    assert [ax.get_ylabel() for ax in axes] == [
        "kernel_rel_error",
        "kernel_rel_error",
        "kernel_mse",
        "loss",
        "val_loss",
    ]
    assert all(ax.get_yscale() == "log" for ax in axes)
    by_step, per_epoch = axes[0], axes[1:]
    assert by_step.get_xscale() == "symlog" and "step" in by_step.get_xlabel()
    np.testing.assert_array_equal(by_step.lines[0].get_xdata(), STEPS["step"])
    assert by_step.get_xlim()[0] <= 0  # step 0, the initial weights, is on the axis
    assert [ax.get_xlabel() for ax in per_epoch] == ["epoch"] * 4
    np.testing.assert_array_equal(per_epoch[0].lines[0].get_xdata(), epochs)
    assert "100 optimizer steps" in fig._suptitle.get_text()
    assert_fits(fig)


def test_curves_without_validation_images():
    history = {
        "epoch": [1, 2],
        "loss": [1.0, 0.5],
        "val_loss": [np.nan, np.nan],
        "kernel_mse": [0.1, 0.01],
        "kernel_rel_error": [0.2, 0.02],
    }
    fig = figures.curves(history, STEPS)
    val = panels(fig)[4]
    assert not val.lines and "no positive val_loss" in val.texts[0].get_text()
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
