"""stages/visualize.py on train-stage outputs written here in the spec's file formats (no
training, no TensorFlow), with a real MLflow store in tmp_path: it writes every figure
and adds them to the training's own run, for one gray kernel, a colour bank with an
activation, and a filter with no true kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from scipy import signal

from src import dead_leaves, images, kernels, paths, stage_files
from src.errors import UserError
from src.stack import Stack
from stages import visualize

REPO = Path(__file__).resolve().parents[1]
N, SIZE, SNAPSHOTS, EPOCHS = 8, 48, 12, 3
EXPERIMENT = "visualize-test"
FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")
SOBEL = kernels.SOBEL_X[:, :, None, None]
RED = np.stack([1.5 * np.ones((3, 3)), -1.5 * np.ones((3, 3)), -1.5 * np.ones((3, 3))], -1)
COLOUR_BANK = np.stack([RED, np.repeat(kernels.SOBEL_X[:, :, None], 3, axis=2) / 3], -1)


class SavedModel:
    """Stands in for the Keras model: visualize must not read model/model.keras."""

    def save(self, path):
        Path(path).write_text("not a model: visualize must not load it")


def stacks_hold_channels() -> bool:
    """Whether src/stack.py reads the spec's (N, H, W, C) stacks yet (the data branch)."""
    probe = Path("probe.npy")
    np.save(probe, np.zeros((1, 2, 2, 1), np.float32))
    try:
        Stack(probe).close()
        return True
    except UserError:
        return False
    finally:
        probe.unlink()


class ArrayStack:
    """Stands in for src.stack.Stack on (N, H, W, C) files while it reads 3-D ones only."""

    def __init__(self, path):
        self.rows = np.load(path, mmap_mode="r")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return np.array(self.rows[key])


def stack(array: np.ndarray) -> np.ndarray:
    """An (N, H, W, C) array as the stack files hold it: as it is, or, while src/stack.py
    reads (N, H, W) stacks only (until the data branch lands), (N, H, W) for one channel
    and read through ArrayStack for colour."""
    if stacks_hold_channels():
        return array
    if array.shape[3] == 1:
        return array[..., 0]
    mp = pytest.MonkeyPatch()  # undone when the test's own monkeypatch is
    mp.setattr(stage_files, "open_gray_images", lambda: ArrayStack(paths.GRAY_IMAGES))
    mp.setattr(stage_files, "open_targets", lambda: ArrayStack(paths.TARGETS))
    PATCHES.append(mp)
    return array


PATCHES: list[pytest.MonkeyPatch] = []


@pytest.fixture(autouse=True)
def _undo_stack_patches():
    yield
    while PATCHES:
        PATCHES.pop().undo()


def reference_output(gray: np.ndarray, kernel: np.ndarray, bias, activation) -> np.ndarray:
    """(N, H', W', F) 'valid' targets by scipy's correlate2d, slice by slice."""
    out = np.stack(
        [
            np.stack(
                [
                    sum(
                        signal.correlate2d(image[..., c], kernel[:, :, c, f], mode="valid")
                        for c in range(kernel.shape[2])
                    )
                    for f in range(kernel.shape[3])
                ],
                -1,
            )
            for image in gray
        ]
    )
    return visualize.ACTIVATIONS[activation](out + np.asarray(bias))


def write_training_outputs(
    root: Path,
    true: np.ndarray = SOBEL,
    names=("sobel_x",),
    *,
    activation: str = "linear",
    linear: bool = True,
    lstsq: bool = True,
    artifact_uri: bool = True,
) -> None:
    """A workspace after download → grayscale → filter → train, in 'valid' padding: the
    files the filter and train stages write, in the spec's formats, with kernel snapshots
    converging to `true` (kh, kw, C, F). linear=False is a filter with no true kernel
    (true is then what the layer learns): no kernel.npy, no kernel columns."""
    (root / "params.yaml").write_text(
        yaml.safe_dump({"kernel": ",".join(names), "mlflow": {"experiment": EXPERIMENT}})
    )
    kh, kw, channels, filters = true.shape
    paths.RAW_IMAGES.mkdir(parents=True)
    image_names = [f"leaves{i}.png" for i in range(N)]
    for i, name in enumerate(image_names):  # colour, and not square: the crop must match
        Image.fromarray(dead_leaves.render(i, 64, 0)[:, 4:60]).save(paths.RAW_IMAGES / name)
    if channels == 3:
        gray = np.stack([images.read_rgb_fitted(paths.RAW_IMAGES / n, SIZE) for n in image_names])
        gray = gray.astype(np.float32) / (255 if gray.max() > 1 else 1)
    else:
        gray = np.stack([images.read_gray_fitted(paths.RAW_IMAGES / n, SIZE) for n in image_names])
        gray = gray[..., None]
    paths.GRAY.mkdir(parents=True)
    np.save(paths.GRAY_IMAGES, stack(gray.astype(np.float32)))
    stage_files.write_index(
        paths.GRAY, image_names, ["val" if i in (2, 5) else "train" for i in range(N)]
    )
    paths.FILTERED.mkdir(parents=True)
    targets = reference_output(gray, true, 0.0, activation).astype(np.float32)
    np.save(paths.TARGETS, stack(targets))
    if linear:
        np.save(paths.KERNEL, true)
    info = {
        "kernel": ",".join(names),
        "names": list(names),
        "shape": [kh, kw],
        "channels": channels,
        "filters": filters,
        "activation": activation,
        "linear": linear,
        "rescale": 1,
        "operation": "correlate",
        "padding": "valid",
        "noise_std": 0.0,
        "images": N,
        "target_shape": list(targets.shape[1:3]),
    }
    paths.FILTER_INFO.write_text(json.dumps(info, indent=2))

    step = np.concatenate([[0], np.round(np.geomspace(1, 300, SNAPSHOTS - 1)).astype(int)])
    start = np.random.default_rng(0).uniform(-0.6, 0.6, true.shape)
    snapshots = true + start * np.exp(-step / 40)[:, None, None, None, None]
    errors = snapshots - true
    per_filter = np.sum(errors**2, axis=(1, 2, 3)) / np.sum(true**2, axis=(0, 1, 2))
    steps = pd.DataFrame({"step": step, "epoch": np.where(step == 0, 0, (step - 1) // 100 + 1)})
    if linear:
        steps["kernel_mse"] = np.mean(errors**2, axis=(1, 2, 3, 4))
        steps["kernel_rel_error"] = np.sum(errors**2, axis=(1, 2, 3, 4)) / np.sum(true**2)
        if filters > 1:
            for f, name in enumerate(names):
                steps[f"kernel_rel_error/{name}"] = per_filter[:, f]
    epoch = np.arange(1, EPOCHS + 1)
    at_epoch_end = steps.set_index("step").reindex(epoch * 100, method="nearest")
    history = pd.DataFrame(
        {
            "epoch": epoch,
            "steps": epoch * 100,
            "crop_loss": 1.0 / epoch,
            "loss": 1e-3 / epoch,
            "val_loss": 2e-3 / epoch,
            "explained_variance": 1 - 1e-3 / epoch**3,
        }
    )
    kernel_columns = [c for c in steps.columns if c.startswith("kernel_")]
    for column in kernel_columns:
        history[column] = at_epoch_end[column].to_numpy()
    history = history.assign(
        newton_step=1e-2 / epoch**4,
        standard_error=1e-6,
        kernel_change=1e-2 / epoch**4,
        elapsed_s=0.5 * epoch,
    )
    final = {
        "converged": True,
        "stop_reason": "optimum",
        "steps": 300,
        "epochs": EPOCHS,
        "loss": 1e-3 / EPOCHS,
        "val_loss": 2e-3 / EPOCHS,
        "explained_variance": 1 - 1e-3 / EPOCHS**3,
        "lstsq_val_loss": 5e-4,
        "lstsq_explained_variance": 1 - 1e-5,
    }
    if linear:
        final.update(
            kernel_rel_error=float(steps.kernel_rel_error.iloc[-1]),
            lstsq_kernel_rel_error=1e-9,
        )
        if filters > 1:
            final.update(
                {f"kernel_rel_error/{n}": float(per_filter[-1, f]) for f, n in enumerate(names)}
            )

    client = MlflowClient(paths.tracking_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    )
    run = client.create_run(experiment_id)
    client.log_dict(run.info.run_id, {"kernel": info["kernel"]}, "params.yaml")  # as training
    client.set_terminated(run.info.run_id)
    paths.MODEL.mkdir()
    np.save(paths.LEARNED_KERNEL, snapshots[-1])
    paths.BIAS.write_text(json.dumps({"bias": [1e-6] * filters}))
    np.save(paths.KERNEL_HISTORY, snapshots)
    if lstsq:
        np.save(paths.LSTSQ_KERNEL, true + 1e-5)
    SavedModel().save(paths.MODEL_FILE)
    run_info = {"run_id": run.info.run_id, "tracking_uri": paths.tracking_uri()}
    if artifact_uri:
        run_info["artifact_uri"] = run.info.artifact_uri
    paths.RUN_INFO.write_text(json.dumps(run_info))
    paths.METRICS.mkdir(exist_ok=True)
    history.to_csv(paths.HISTORY, index=False)
    steps.to_csv(paths.STEPS, index=False)
    paths.TRAIN_METRICS.write_text(json.dumps(final))


def enter(mp: pytest.MonkeyPatch, root) -> None:
    for var in (
        "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
    ):
        mp.delenv(var, raising=False)
    mp.setenv("DVC_ROOT", str(root))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.chdir(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The training outputs of one gray kernel, written once for this file."""
    root = tmp_path_factory.mktemp("ws")
    with pytest.MonkeyPatch.context() as mp:
        enter(mp, root)
        write_training_outputs(root)
    return root


@pytest.fixture
def workspace(trained, monkeypatch):
    enter(monkeypatch, trained)
    return trained


def the_run(root):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "visualize must add to the training run, not start another"
    return client, runs[0]


def assert_figures_logged(root):
    for name in FIGURES:
        assert (paths.FIGURES / name).stat().st_size > 0, name
    assert sorted(p.name for p in paths.FIGURES.iterdir()) == sorted(FIGURES)  # no leftovers
    client, run = the_run(root)
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {f"figures/{name}" for name in FIGURES}


def test_writes_every_figure_into_the_training_run(workspace, caplog):
    _, before = the_run(workspace)
    caplog.set_level("INFO", logger="visualize")
    visualize.main()

    assert_figures_logged(workspace)
    with Image.open(paths.FIGURES / "convergence.gif") as gif:
        assert gif.n_frames == SNAPSHOTS  # one per kernel snapshot, not per epoch
    with Image.open(paths.FIGURES / "sample.png") as sample:
        assert sample.width > 3.8 * sample.height  # five panels: the colour original is in
    assert the_run(workspace)[1].info.run_id == before.info.run_id
    assert any(
        f"{SNAPSHOTS} frames of {SNAPSHOTS} kernel snapshots, steps 0 to 300" in r.getMessage()
        for r in caplog.records
    )


def test_running_again_replaces_the_figures_in_the_same_run(workspace):
    visualize.main()
    visualize.main()
    client, run = the_run(workspace)
    assert len(client.list_artifacts(run.info.run_id, "figures")) == len(FIGURES)


def test_it_runs_without_tensorflow_mlflow_or_scipy(workspace):
    """The stage end to end in a fresh process: neither TensorFlow, Keras, MLflow nor
    SciPy is imported (the run's artifacts are a local folder), and model/model.keras
    (here not a model at all) is never read."""
    code = (
        "import sys\n"
        "from src.errors import run_stage\n"
        "from stages import visualize\n"
        "run_stage(visualize.main)\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('tensorflow', 'keras', 'mlflow', 'scipy'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workspace,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convergence.gif" in result.stderr  # the stage's own log line


def test_a_run_without_a_local_artifact_folder_logs_through_mlflow(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    write_training_outputs(tmp_path, artifact_uri=False)
    assert visualize.local_artifacts(stage_files.read_run()) is None
    visualize.main()
    assert_figures_logged(tmp_path)


def test_a_colour_bank_with_an_activation(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    write_training_outputs(tmp_path, COLOUR_BANK, ("red", "sobel_x"), activation="sigmoid")
    visualize.main()
    assert_figures_logged(tmp_path)
    with Image.open(paths.FIGURES / "convergence.gif") as gif:
        assert gif.n_frames == SNAPSHOTS
        assert gif.width > 560  # three learned and three true slices a row, not one each


def test_a_filter_with_no_true_kernel(tmp_path, monkeypatch):
    """median: no kernel.npy and no kernel columns; learned beside the closed form."""
    blur = np.full((5, 5, 1, 1), 0.04)
    enter(monkeypatch, tmp_path)
    write_training_outputs(tmp_path, blur, ("median",), linear=False)
    assert stage_files.read_true_kernel() is None
    visualize.main()
    assert_figures_logged(tmp_path)


def test_a_filter_with_no_true_kernel_nor_closed_form(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    write_training_outputs(
        tmp_path, np.full((3, 3, 1, 1), 0.1), ("max",), linear=False, lstsq=False
    )
    visualize.main()
    assert_figures_logged(tmp_path)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("activation", ["linear", "relu", "sigmoid", "tanh"])
def test_layer_output_is_what_the_conv2d_computes(padding, activation):
    rng = np.random.default_rng(4)
    image = rng.random((12, 11, 3))
    kernel = rng.normal(size=(4, 3, 3, 2))  # even height: 'same' pads the odd row after
    bias = [0.1, -0.2]
    got = visualize.layer_output(image, kernel, bias, padding, activation)
    if padding == "same":
        image = np.pad(image, ((1, 2), (1, 1), (0, 0)))
    want = reference_output(image[None], kernel, bias, activation)[0]
    assert got.shape == want.shape == ((9, 9, 2) if padding == "valid" else (12, 11, 2))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_snapshots_and_steps_that_disagree_name_train(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    write_training_outputs(tmp_path)
    pd.read_csv(paths.STEPS).iloc[:-1].to_csv(paths.STEPS, index=False)
    with pytest.raises(
        UserError,
        match=r"^model/kernels.npy \(12, 3, 3, 1, 1\), metrics/steps.csv \(11 snapshots\), "
        r"model/kernel.npy \(3, 3, 1, 1\), .*"
        r"don't match; rerun training with `dvc repro -f train`$",
    ):
        visualize.main()
    assert not paths.FIGURES.exists()


def test_without_training_outputs_it_says_what_to_run(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    with pytest.raises(UserError, match=r"^model/kernels.npy is missing; run .*`dvc repro`"):
        visualize.main()
    assert not paths.FIGURES.exists()


def test_the_original_is_shown_only_for_a_colour_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths.RAW_IMAGES.mkdir(parents=True)
    colour = dead_leaves.render(0, 40, 0)
    Image.fromarray(colour).save(paths.RAW_IMAGES / "colour.png")
    Image.fromarray(colour).convert("L").save(paths.RAW_IMAGES / "gray.png")
    assert visualize.read_original("colour.png", 32).shape == (32, 32, 3)
    assert visualize.read_original("gray.png", 32) is None
    assert visualize.read_original("gone.png", 32) is None


@pytest.mark.parametrize(
    "shape, padding, centre",
    [
        ((3, 3), "valid", (1.0, 1.0)),
        ((32, 32), "valid", (15.5, 15.5)),
        ((3, 3), "same", (0.0, 0.0)),
        ((4, 2), "same", (0.5, 0.5)),
    ],
)
def test_window_centre_lines_the_target_up_with_the_input(shape, padding, centre):
    assert visualize.window_centre(shape, padding) == centre
