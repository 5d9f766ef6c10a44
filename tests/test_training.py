import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from mlflow import MlflowClient
from scipy import ndimage

from src import kernels, layers, paths, stage_files, streams, training
from src.config import TrainConfig
from src.errors import UserError
from src.filtering import correlate
from src.stack import write_stack

RNG = np.random.default_rng(7)


def pink_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Images with a 1/f² power spectrum, like natural scenes, in [0, 1]."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / size)
    spectrum = amplitude * (
        rng.normal(size=(count, size, size // 2 + 1))
        + 1j * rng.normal(size=(count, size, size // 2 + 1))
    )
    images = np.fft.irfft2(spectrum, s=(size, size))
    images -= images.min(axis=(1, 2), keepdims=True)
    images /= images.max(axis=(1, 2), keepdims=True)
    return images.astype(np.float32)


def config(**overrides) -> TrainConfig:
    """params.yaml's training settings, on tiny batches and crops."""
    return TrainConfig(**{"batch_size": 2, "crop": 32, **overrides})


@pytest.mark.parametrize("whiten", ["gradient", "laplacian"])
def test_whitening_commutes_with_the_kernel(whiten):
    """W(k ⋆ x) == k ⋆ W(x): the optimum is the same with or without whitening."""
    images = pink_images(2, 24)
    k = RNG.normal(size=(4, 3))
    target = correlate(images, k, "valid")
    wx, wt = training.whiten_pair(tf.constant(images), tf.constant(target), whiten)
    np.testing.assert_allclose(correlate(wx.numpy(), k, "valid"), wt.numpy(), atol=1e-4)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_crops_cut_targets_aligned_with_their_inputs(padding):
    images = pink_images(5, 40)
    k = kernels.make("smiley")[:6, :4]  # even and odd sides, not symmetric
    targets = correlate(images, k, padding)
    batches = training.crops(
        images, targets, np.arange(5), k.shape, padding, 2, 16, np.random.default_rng(0)
    )
    seen = 0
    for x, t in batches:
        np.testing.assert_allclose(t[..., 0], correlate(x[..., 0], k, "valid"), atol=1e-5)
        seen += len(x)
    assert seen == 5


def explicit_top_curvature(x: np.ndarray, shape: tuple[int, int]) -> float:
    """Top eigenvalue of the Hessian of mean((A k - t)²), 2 AᵀA / M, with A's columns
    the outputs for each unit kernel."""
    columns = []
    for i in range(shape[0] * shape[1]):
        unit = np.zeros(shape[0] * shape[1])
        unit[i] = 1
        columns.append(correlate(x[..., 0], unit.reshape(shape), "valid").ravel())
    a = np.stack(columns, axis=1).astype(np.float64)
    return float(np.linalg.eigvalsh(2 * a.T @ a / a.shape[0]).max())


@pytest.mark.parametrize("side, shape", [(12, (3, 3)), (8, (1, 2)), (30, (11, 11))])
def test_top_curvature_of_a_small_kernel_is_the_explicit_hessians(side, shape):
    x = RNG.normal(size=(3, side, side, 1)).astype(np.float32)
    assert training.top_curvature(tf.constant(x), shape, seed=0) == pytest.approx(
        explicit_top_curvature(x, shape), rel=1e-9
    )


@pytest.mark.parametrize("side, shape, within", [(64, (16, 16), 0.05), (48, (12, 11), 0.02)])
def test_top_curvature_of_a_large_kernel_is_close_to_the_explicit_hessians_and_never_above(
    side, shape, within
):
    assert shape[0] * shape[1] > training.EXACT_HESSIAN_MAX_TAPS  # the Toeplitz estimate
    # whitened smooth images, as in training; borders matter more on small crops
    smooth = ndimage.gaussian_filter(RNG.normal(size=(4, side + 1, side + 1)), (0, 2, 2))
    x = np.asarray(training.WHITENERS["gradient"](smooth.astype(np.float32)))[..., None]
    expected = explicit_top_curvature(x, shape)
    got = training.top_curvature(x, shape, seed=0)
    assert (1 - within) * expected <= got <= expected * (1 + 1e-9)
    assert training.top_curvature(x, shape, seed=0) == got  # seeded


def test_kernel_errors():
    true = np.array([[1.0, -1.0]])
    assert kernels.errors(true, true) == (0.0, 0.0)
    mse, rel = kernels.errors(np.array([[1.0, 0.0]]), true)
    assert mse == pytest.approx(0.5) and rel == pytest.approx(0.5)


def train_tiny(kernel_name="sobel_x", padding="valid", seed=0, size=48, true=None, **overrides):
    images = pink_images(18, size, seed=1)
    kernel = kernels.make(kernel_name)
    targets = correlate(images, kernel, padding)
    split = np.array(["train"] * 16 + ["val"] * 2)
    cfg = config(**overrides)
    snapshots = training.KernelSnapshots(cfg.max_steps)
    model, fit = training.train(
        images,
        targets,
        kernel if true is None else true,
        split,
        padding,
        cfg,
        seed,
        callbacks=[snapshots],
    )
    history = pd.DataFrame(fit.history).assign(epoch=np.array(fit.epoch) + 1)
    assert snapshots.steps[0] == 0 and snapshots.steps[-1] == history.steps.iloc[-1]
    np.testing.assert_array_equal(snapshots.kernels[-1], layers.learned_kernel(model))
    return model, history, images, targets, kernel, snapshots


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_training_recovers_the_kernel_and_stops_when_converged(padding):
    model, history, images, targets, true, _ = train_tiny(padding=padding)
    assert history.epoch.tolist() == list(range(1, len(history) + 1))
    last = history.iloc[-1]
    assert last.converged == 1 and last.newton_step < 1e-5
    assert history.converged.iloc[:-1].eq(0).all(), "it stops at the first converged epoch"
    assert last.steps == 16 * len(history)  # 8 batches of 2, but min_epoch_steps 16
    assert last.kernel_rel_error < 1e-8
    np.testing.assert_allclose(layers.learned_kernel(model), true, atol=1e-3)
    # the returned model predicts in the filter's padding, un-whitened
    prediction = model(images[-2:, ..., None]).numpy()[..., 0]
    assert prediction.shape == targets[-2:].shape
    assert np.mean((prediction - targets[-2:]) ** 2) == pytest.approx(last.val_loss, rel=1e-3)


def test_fft_training_recovers_a_large_kernel():
    _, history, *_ = train_tiny("smiley", size=96, crop=80, batch_size=4)
    assert history.converged.iloc[-1] == 1 and history.kernel_rel_error.iloc[-1] < 1e-6


def test_without_preconditioning_the_kernel_error_lags():
    """The reason K-FAC is the default: same step budget, far worse kernel. Photos are
    smoother along some directions than others, and derivative whitening leaves that
    spread of curvatures; K-FAC evens it out."""
    images = ndimage.gaussian_filter(pink_images(18, 96, seed=1), (0, 0, 1))  # smooth along x
    true = kernels.make("smiley")
    targets = correlate(images, true, "valid")
    split = np.array(["train"] * 16 + ["val"] * 2)
    errors = {}
    for precondition in ("none", "kfac"):
        cfg = config(crop=80, batch_size=16, max_steps=32, precondition=precondition)
        _, fit = training.train(images, targets, true, split, "valid", cfg, 0)
        errors[precondition] = fit.history["kernel_rel_error"][-1]
    assert errors["kfac"] < errors["none"] / 1000


def test_the_cap_stops_an_unconverged_run_mid_epoch():
    _, history, *_, snapshots = train_tiny("smiley", size=96, crop=80, max_steps=3)
    assert len(history) == 1 and history.steps.iloc[-1] == 3
    assert history.converged.iloc[-1] == 0 and history.newton_step.iloc[-1] > 1e-5
    assert snapshots.steps == [0, 1, 2, 3] and snapshots.epochs == [0, 1, 1, 1]


def test_snapshots_are_log_spaced_from_step_0_to_the_last():
    _, history, *_, snapshots = train_tiny("smiley", size=96, crop=80, max_steps=300)
    steps = np.array(snapshots.steps)
    assert steps[0] == 0 and steps[-1] == history.steps.iloc[-1]
    assert np.all(np.diff(steps) > 0) and len(steps) <= training.MAX_SNAPSHOTS + 2
    assert list(steps[:8]) == list(range(8)), "every early step, where the kernel moves most"
    gaps = np.diff(steps)
    assert gaps[-2] > gaps[1], "sparser later"
    assert snapshots.epochs == [0] + [(s - 1) // 16 + 1 for s in steps[1:]]  # 16 steps an epoch
    assert len({k.tobytes() for k in snapshots.kernels}) == len(steps), "the kernel moves"


def test_the_stopping_rule_never_reads_the_true_kernel():
    """The true kernel is only measured: a wrong one changes the reported error, nothing else."""
    _, right, *_ = train_tiny()
    _, wrong, *_ = train_tiny(true=np.ones((3, 3)))
    for key in ("loss", "newton_step", "steps", "converged", "learning_rate"):
        np.testing.assert_array_equal(right[key], wrong[key])
    assert wrong.kernel_rel_error.iloc[-1] > 0.5


def test_the_newton_step_measures_the_distance_to_the_optimum():
    """For noise-free targets the optimum is the true kernel: the step is its distance."""
    images = pink_images(6, 64, seed=2)
    true = kernels.make("smiley")[:7, :5]
    targets = correlate(images, true, "valid")
    x, t = training.whiten_pair(
        tf.constant(images[..., None]), tf.constant(targets[..., None]), "gradient"
    )
    x, t = np.asarray(x, np.float64)[..., 0], np.asarray(t, np.float64)[..., 0]
    step = training.NewtonStep(x, t, training.Preconditioner(x, true.shape).inverse)
    assert step(true) < 1e-6
    for size in (1e-1, 1e-3):
        off = true + size * RNG.normal(size=true.shape) * np.abs(true).max()
        distance = np.linalg.norm(off - true) / np.linalg.norm(off)
        assert step(off) == pytest.approx(distance, rel=0.1)


def test_a_few_images_still_get_min_epoch_steps():
    cfg = config(batch_size=16)
    assert training.epoch_steps(3, cfg) == 16 and training.epoch_steps(400, cfg) == 25
    assert training.epoch_steps(3, config(batch_size=16, min_epoch_steps=1)) == 1
    assert training.epoch_steps(17, config(batch_size=16, min_epoch_steps=1), shares=2) == 1


def test_noisy_targets_converge_as_the_learning_rate_halves():
    images = pink_images(18, 48, seed=1)
    true = kernels.make("sobel_x")
    targets = correlate(images, true, "valid")
    targets += np.random.default_rng(0).normal(0, 0.05 * targets.std(), targets.shape)
    split = np.array(["train"] * 16 + ["val"] * 2)
    _, fit = training.train(images, targets, true, split, "valid", config(), 0)
    history = pd.DataFrame(fit.history)
    assert history.converged.iloc[-1] == 1
    assert history.learning_rate.iloc[-1] < history.learning_rate.iloc[0]
    assert history.kernel_rel_error.iloc[-1] < 1e-3


def test_the_original_recipe_trains_with_adam_on_whole_images_at_its_own_rate():
    _, history, *_ = train_tiny(recipe="original", max_steps=40, batch_size=16, crop=128)
    assert (
        history.steps.iloc[-1] == 40 and len(history) == 3
    )  # 16 steps an epoch (16 images, batch 1)
    assert np.allclose(history.learning_rate, 1e-3), "the original keeps Adam's rate"
    assert history.converged.iloc[-1] == 0


def test_same_seed_same_metrics_and_other_seed_differs():
    _, first, *_ = train_tiny(seed=3, max_steps=20)
    _, second, *_ = train_tiny(seed=3, max_steps=20)
    _, other, *_ = train_tiny(seed=4, max_steps=20)
    assert len(first) == len(second)
    for (_, a), (_, b) in zip(first.iterrows(), second.iterrows()):
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-12)
        assert a.kernel_mse == pytest.approx(b.kernel_mse, rel=1e-5, abs=1e-15)
    assert other.loss.iloc[0] != pytest.approx(first.loss.iloc[0], rel=1e-5)


def test_a_learning_rate_too_high_stops_with_a_clear_message():
    with pytest.raises(UserError, match="diverged.*lower train.learning_rate"):
        train_tiny(learning_rate=1e6, precondition="none", max_steps=20)


def test_no_training_images_is_a_user_error():
    images = pink_images(2, 16)
    true = kernels.make("sobel_x")
    with pytest.raises(UserError, match="no training images"):
        training.train(
            images,
            correlate(images, true, "valid"),
            true,
            np.array(["val", "val"]),
            "valid",
            config(),
            0,
        )


def test_scipy_agrees_on_orientation_of_the_learned_kernel():
    """The learned kernel is in correlation orientation, like scipy.ndimage.correlate."""
    model, _, images, _, true, _ = train_tiny()
    learned = layers.learned_kernel(model)
    x = images[0].astype(np.float64)
    np.testing.assert_allclose(
        ndimage.correlate(x, learned)[1:-1, 1:-1], ndimage.correlate(x, true)[1:-1, 1:-1], atol=0.05
    )


@pytest.mark.parametrize(
    "kernel_name, whiten, level",
    [("sobel_x", "gradient", 0.5), ("smiley", "laplacian", 0.5), ("sobel_x", "none", 0.0)],
)
def test_flat_single_colour_images_are_a_user_error(kernel_name, whiten, level):
    """Nothing to learn: after whitening every crop is zero, so is the loss's curvature."""
    images = np.full((6, 96, 96), level, np.float32)
    true = kernels.make(kernel_name)
    with pytest.raises(UserError) as caught:
        training.train(
            images,
            correlate(images, true, "valid"),
            true,
            np.array(["train"] * 6),
            "valid",
            config(whiten=whiten, crop=80),
            0,
        )
    message = str(caught.value)
    assert message.startswith("the training images have no contrast to learn from")
    assert f"train.whiten={whiten}" in message and "data.source" in message
    assert "\n" not in message


def probe_row(seed: int = 0) -> int:
    """A training row of train_tiny that the step-size probe reads, before fitting."""
    return int(streams.rng(seed, streams.CROPS).permutation(16)[0])


def late_row(seed: int = 0) -> int:
    """A training row of train_tiny read in the last step of epoch 1, inside tf.data."""
    return int(streams.rng(seed, streams.CROPS).permutation(16)[-1])


@pytest.mark.parametrize(
    "path, row, stage",
    [
        (paths.GRAY_IMAGES, probe_row(), "grayscale"),
        (paths.TARGETS, late_row(), "filter"),
        (paths.GRAY_IMAGES, 17, "grayscale"),  # a validation image, read after epoch 1
    ],
    ids=["gray-probe", "targets-in-tf.data", "gray-val"],
)
def test_a_nan_in_a_stage_file_stops_training_naming_the_stage_to_rerun(
    tmp_path, monkeypatch, path, row, stage
):
    monkeypatch.chdir(tmp_path)  # stage paths are relative to the repo root
    images = pink_images(18, 48, seed=1)
    true = kernels.make("sobel_x")
    arrays = {paths.GRAY_IMAGES: images, paths.TARGETS: correlate(images, true, "valid")}
    arrays[path][row, 24, 23] = np.nan  # under every 32² crop of its row
    for file, array in arrays.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        write_stack(file, iter(array), len(array), array.shape[1:])
    split = np.array(["train"] * 16 + ["val"] * 2)
    with (
        stage_files.open_gray_images() as gray,
        stage_files.open_targets() as targets,
        pytest.raises(UserError) as caught,
    ):
        training.train(gray, targets, true, split, "valid", config(max_steps=20), 0)
    assert str(caught.value) == (
        f"{path} holds NaN or infinity (row {row}): it is corrupted; rerun `dvc repro -f {stage}`"
    )


def test_without_validation_images_the_logs_have_no_val_loss():
    images = pink_images(8, 48, seed=1)
    true = kernels.make("sobel_x")
    _, fit = training.train(
        images,
        correlate(images, true, "valid"),
        true,
        np.array(["train"] * 8),
        "valid",
        config(max_steps=20),
        0,
    )
    assert "val_loss" not in fit.history  # not NaN: absent, as Keras leaves it without val data
    assert all(np.all(np.isfinite(values)) for values in fit.history.values())


def refuse_constant(constant):
    raise ValueError(f"{constant} is not JSON")


def test_train_stage_without_held_out_images_then_on_a_corrupted_target(workspace):
    """End to end, real dvc, stages and MLflow: with data.val_fraction=0 the metrics are
    strict JSON and hold no val_loss anywhere; then a NaN in targets.npy stops
    `python -m stages.train` with one line naming the stage to rerun, keeping the outputs."""
    root = workspace.root
    workspace.set_params({"data": {"val_fraction": 0.0}})
    workspace.commit("no held-out images")
    workspace.dvc("repro")  # visualize too: it reads the history without val_loss
    before = (root / "metrics/train.json").read_text()
    metrics = json.loads(before, parse_constant=refuse_constant)
    assert "val_loss" not in metrics and metrics["kernel_rel_error"] < 1.0
    history = pd.read_csv(root / "metrics/history.csv", keep_default_na=False)
    assert history.val_loss.tolist() == [""] * len(history)
    client = MlflowClient(workspace.tracking_uri)
    experiment = client.get_experiment_by_name("learn-linear-filter")
    (run,) = client.search_runs([experiment.experiment_id])
    assert "kernel_rel_error" in run.data.metrics and "val_loss" not in run.data.metrics

    targets = np.load(root / "data/filtered/targets.npy", mmap_mode="r+")
    targets[3, 30, 30] = np.nan  # every training image is read whole for the bias
    targets.flush()
    del targets
    result = workspace.run(sys.executable, "-m", "stages.train", check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: data/filtered/targets.npy holds NaN or infinity (row 3): it is corrupted; "
        "rerun `dvc repro -f filter`"
    )
    assert "Traceback" not in result.stderr
    assert (root / "metrics/train.json").read_text() == before


@pytest.mark.parametrize("max_steps", [1, 3, 40, 400, 2000, 10**6])
def test_snapshot_steps_are_a_few_dozen_log_spaced_from_0(max_steps):
    steps = sorted(training.snapshot_steps(max_steps))
    assert steps[0] == 0 and steps[-1] == max_steps
    assert len(steps) <= training.MAX_SNAPSHOTS + 1
    if max_steps <= training.MAX_SNAPSHOTS:
        assert steps == list(range(max_steps + 1))  # a short run records every step
    assert steps[:4] == list(range(min(4, max_steps + 1)))  # dense where the kernel moves
