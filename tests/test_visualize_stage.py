"""stages/visualize.py on train-stage outputs written here in their contract format (no
training, no TensorFlow), with a real MLflow store in tmp_path: it writes every figure
and adds them to the training's own run."""

from __future__ import annotations

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

from src import dead_leaves, filtering, images, kernels, paths, stage_files
from src.errors import UserError
from stages import visualize

REPO = Path(__file__).resolve().parents[1]
N, SIZE, SNAPSHOTS, EPOCHS = 8, 48, 12, 3
EXPERIMENT = "visualize-test"
FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")


class SavedModel:
    """Stands in for the Keras model: visualize must not read model/model.keras."""

    def save(self, path):
        Path(path).write_text("not a model: visualize must not load it")


def write_training_outputs(root: Path) -> None:
    """A workspace after download → grayscale → filter → train: sobel_x in 'valid'
    padding, and what training writes, the kernel snapshots converging to it."""
    (root / "params.yaml").write_text(
        yaml.safe_dump({"kernel": "sobel_x", "mlflow": {"experiment": EXPERIMENT}})
    )
    paths.RAW_IMAGES.mkdir(parents=True)
    names = [f"leaves{i}.png" for i in range(N)]
    for i, name in enumerate(names):  # colour, and not square: the crop must match
        Image.fromarray(dead_leaves.render(i, 64, 0)[:, 4:60]).save(paths.RAW_IMAGES / name)
    gray = np.stack([images.read_gray_fitted(paths.RAW_IMAGES / n, SIZE) for n in names])
    paths.GRAY.mkdir(parents=True)
    np.save(paths.GRAY_IMAGES, gray)
    stage_files.write_index(
        paths.GRAY, names, ["val" if i in (2, 5) else "train" for i in range(N)]
    )
    paths.FILTERED.mkdir(parents=True)
    true = kernels.SOBEL_X
    targets = filtering.correlate(gray, true, "valid")
    np.save(paths.TARGETS, targets)
    stage_files.write_filter_outputs(
        paths.FILTERED,
        true.astype(np.float32),
        stage_files.FilterInfo(
            kernel="sobel_x",
            shape=(3, 3),
            operation="correlate",
            padding="valid",
            noise_std=0.0,
            images=N,
            target_shape=targets.shape[1:],
        ),
    )

    step = np.concatenate([[0], np.round(np.geomspace(1, 300, SNAPSHOTS - 1)).astype(int)])
    start = np.random.default_rng(0).uniform(-0.6, 0.6, true.shape)
    snapshots = true + start * np.exp(-step / 40)[:, None, None]
    errors = snapshots - true
    steps = pd.DataFrame(
        {
            "step": step,
            "epoch": np.where(step == 0, 0, (step - 1) // 100 + 1),
            "kernel_mse": np.mean(errors**2, axis=(1, 2)),
            "kernel_rel_error": np.sum(errors**2, axis=(1, 2)) / np.sum(true**2),
        }
    )
    epoch = np.arange(1, EPOCHS + 1)
    at_epoch_end = steps.set_index("step").reindex(epoch * 100, method="nearest")
    history = pd.DataFrame(
        {
            "epoch": epoch,
            "loss": 1.0 / epoch,
            "val_loss": 2.0 / epoch,
            "kernel_mse": at_epoch_end.kernel_mse.to_numpy(),
            "kernel_rel_error": at_epoch_end.kernel_rel_error.to_numpy(),
            "elapsed_s": 0.5 * epoch,
        }
    )

    client = MlflowClient(paths.tracking_uri())
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(root / "art").as_uri())
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    paths.MODEL.mkdir()
    stage_files.write_model(
        paths.MODEL,
        learned_kernel=snapshots[-1],
        bias=1e-6,
        kernel_history=snapshots,
        model=SavedModel(),
        run={"run_id": run.info.run_id, "tracking_uri": paths.tracking_uri()},
    )
    stage_files.write_history(history)
    stage_files.write_steps(steps)


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
    """The training outputs, written once for this file."""
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


def test_writes_every_figure_into_the_training_run(workspace, caplog):
    _, before = the_run(workspace)
    caplog.set_level("INFO", logger="visualize")
    visualize.main()

    for name in FIGURES:
        assert (paths.FIGURES / name).stat().st_size > 0, name
    assert sorted(p.name for p in paths.FIGURES.iterdir()) == sorted(FIGURES)  # no leftovers
    with Image.open(paths.FIGURES / "convergence.gif") as gif:
        assert gif.n_frames == SNAPSHOTS  # one per kernel snapshot, not per epoch
    with Image.open(paths.FIGURES / "sample.png") as sample:
        assert sample.width > 3.8 * sample.height  # five panels: the colour original is in

    client, run = the_run(workspace)
    assert run.info.run_id == before.info.run_id
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {f"figures/{name}" for name in FIGURES}
    assert any(
        f"{SNAPSHOTS} frames of {SNAPSHOTS} kernel snapshots, steps 0 to 300" in r.getMessage()
        for r in caplog.records
    )


def test_running_again_replaces_the_figures_in_the_same_run(workspace):
    visualize.main()
    visualize.main()
    client, run = the_run(workspace)
    assert len(client.list_artifacts(run.info.run_id, "figures")) == len(FIGURES)


def test_it_runs_without_tensorflow(workspace):
    """The stage end to end in a fresh process: neither TensorFlow nor Keras is imported,
    and model/model.keras (here not a model at all) is never read."""
    code = (
        "import sys\n"
        "from src.errors import run_stage\n"
        "from stages import visualize\n"
        "run_stage(visualize.main)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
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


def test_snapshots_and_steps_that_disagree_name_train(tmp_path, monkeypatch):
    enter(monkeypatch, tmp_path)
    write_training_outputs(tmp_path)
    stage_files.write_steps(stage_files.read_steps().iloc[:-1])
    with pytest.raises(
        UserError,
        match=r"^model/kernels.npy \(12, 3, 3\), metrics/steps.csv \(11 snapshots\).*"
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
