"""stages/visualize.py after a real (tiny) training, with real Keras and a real MLflow
store in tmp_path: it writes every figure and adds them to the training's own run."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from src import dead_leaves, filtering, images, kernels, paths, stage_files  # noqa: E402
from src.errors import UserError  # noqa: E402
from stages import train as train_stage  # noqa: E402
from stages import visualize  # noqa: E402

N, SIZE, EPOCHS = 8, 48, 2
EXPERIMENT = "visualize-test"
FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace after download → grayscale → filter → train, built once for this file."""
    root = tmp_path_factory.mktemp("ws")
    with pytest.MonkeyPatch.context() as mp:
        enter(mp, root)
        (root / "params.yaml").write_text(
            yaml.safe_dump(
                {
                    "kernel": "sobel_x",
                    "seed": 0,
                    "data": {"size": SIZE},
                    "train": {"epochs": EPOCHS, "batch_size": 4, "crop": 32},
                    "mlflow": {"experiment": EXPERIMENT},
                }
            )
        )
        paths.RAW_IMAGES.mkdir(parents=True)
        names = [f"leaves{i}.png" for i in range(N)]
        for i, name in enumerate(names):  # colour, and not square: the crop must match
            Image.fromarray(dead_leaves.render(i, 64, 0)[:, 4:60]).save(paths.RAW_IMAGES / name)
        gray = np.stack([images.read_gray_fitted(paths.RAW_IMAGES / n, SIZE) for n in names])
        paths.GRAY.mkdir(parents=True)
        np.save(paths.GRAY_IMAGES, gray)
        paths.GRAY_INDEX.write_text(
            "name,split\n"
            + "".join(f"{n},{'val' if i in (2, 5) else 'train'}\n" for i, n in enumerate(names))
        )
        paths.FILTERED.mkdir(parents=True)
        targets = filtering.correlate(gray, kernels.SOBEL_X, "valid")
        np.save(paths.TARGETS, targets)
        stage_files.write_filter_outputs(
            paths.FILTERED,
            kernels.SOBEL_X.astype(np.float32),
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
        train_stage.main()
    return root


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
        assert gif.n_frames == EPOCHS
    with Image.open(paths.FIGURES / "sample.png") as sample:
        assert sample.width > 3.8 * sample.height  # five panels: the colour original is in

    client, run = the_run(workspace)
    assert run.info.run_id == before.info.run_id
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {f"figures/{name}" for name in FIGURES}
    assert any(
        "figures" in r.getMessage() and "convergence.gif" in r.getMessage() for r in caplog.records
    )


def test_running_again_replaces_the_figures_in_the_same_run(workspace):
    visualize.main()
    visualize.main()
    client, run = the_run(workspace)
    assert len(client.list_artifacts(run.info.run_id, "figures")) == len(FIGURES)


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
