"""The MLflow side of a real (tiny) `dvc repro`, as an MLflow user meets it: the learned
filter as a servable MLflow Model, the training view, the dataset inputs, log10 metrics,
the params that apply, and the registry when it is asked for."""

from __future__ import annotations

import json
import math
import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, TINY, Workspace, clean_env, copy_repo
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `dvc repro` with a registered model, shared by the tests of this module."""
    ws = Workspace(copy_repo(tmp_path_factory.mktemp("ws") / "repo", REPO, who="tests"))
    train = TINY["train"]  # it learns sobel_x to float32 precision, and stops
    ws.set_params(
        {
            **TINY,
            "train": train,
            "kernel": "sobel_x",
            "mlflow": {"registered_model": "sobel-filter"},
        }
    )
    ws.commit("tiny config")
    ws.dvc("repro")
    run_id = json.loads((ws.root / "model/run.json").read_text())["run_id"]
    client = MlflowClient(ws.tracking_uri)
    return ws, client, client.get_run(run_id)


def model_uri(ws) -> str:
    """The logged model, as model/run.json names it for mlflow.pyfunc.load_model."""
    return json.loads((ws.root / "model/run.json").read_text())["model_uri"]


def held_out(ws) -> tuple[np.ndarray, np.ndarray]:
    """The first validation image (1, H, W, C) and its one filter's target (H', W'), as
    the filter stage wrote them ((N, H, W, C) images, (N, H', W', F) targets)."""
    split = pd.read_csv(ws.root / "data/gray/index.csv")["split"].tolist()
    row = split.index("val")
    gray = np.load(ws.root / "data/gray/images.npy")[row]
    target = np.load(ws.root / "data/filtered/targets.npy")[row]
    return gray[None].astype(np.float32), target[..., 0]


def test_pyfunc_predicts_the_filter_stage_target(trained, monkeypatch):
    ws, client, run = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.tracking_uri)
    mlflow.set_tracking_uri(ws.tracking_uri)
    x, target = held_out(ws)
    model = mlflow.pyfunc.load_model(model_uri(ws))
    assert model.metadata.run_id == run.info.run_id
    prediction = np.asarray(model.predict(x))[0, :, :, 0]
    assert run.data.metrics["kernel_rel_error"] < 1e-10  # learned: float32 tolerance applies
    assert prediction.shape == target.shape
    np.testing.assert_allclose(prediction, target, rtol=1e-4, atol=1e-5)


def predict_cli(ws, uri: str, inputs, tmp_path, check: bool = True):
    (tmp_path / "input.json").write_text(json.dumps({"inputs": inputs}))
    return ws.run(
        str(BIN / "mlflow"),
        "models",
        "predict",
        "-m",
        uri,
        "-i",
        str(tmp_path / "input.json"),
        "-t",
        "json",
        "--env-manager",
        "local",
        check=check,
        env=clean_env(MLFLOW_TRACKING_URI=ws.tracking_uri),
    )


def test_mlflow_models_predict_on_the_command_line_prints_only_the_json(trained, tmp_path):
    """Issue 21, item 4 and issue 22, item 4: `... -t json > out.json` is valid JSON."""
    ws, client, run = trained
    x, target = held_out(ws)
    result = predict_cli(ws, model_uri(ws), x.tolist(), tmp_path)
    predictions = json.loads(result.stdout)["predictions"]  # stdout is the JSON, only
    prediction = np.asarray(predictions, dtype=np.float32)[0, :, :, 0]
    np.testing.assert_allclose(prediction, target, rtol=1e-4, atol=1e-5)
    # the model's name is also its runs:/ path
    model = client.get_logged_model(model_uri(ws).removeprefix("models:/"))
    assert model.name == "sobel_x-filter"
    by_name = predict_cli(ws, f"runs:/{run.info.run_id}/sobel_x-filter", x.tolist(), tmp_path)
    assert json.loads(by_name.stdout) == json.loads(result.stdout)


@pytest.mark.parametrize(
    "inputs, says",
    [
        (np.zeros((1, 2, 2, 1)).tolist(), "got 2×2 images, smaller than the 3×3 kernel"),
        (np.zeros((1, 8, 8, 3)).tolist(), "got 3 channels"),
        ([], "got an empty batch"),
    ],
    ids=["smaller-than-the-kernel", "three-channels", "empty"],
)
def test_an_input_the_model_cant_take_is_one_line_on_the_command_line(
    trained, tmp_path, inputs, says
):
    ws, client, run = trained
    result = predict_cli(ws, model_uri(ws), inputs, tmp_path, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert line.startswith("Error: this model takes a batch of float32 images shaped (N, H, W, 1)")
    assert says in line and line == result.stderr.rstrip().splitlines()[-1]


def test_the_model_is_a_logged_model_with_its_metrics_and_a_registered_version(trained):
    ws, client, run = trained
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    assert models[0].name == "sobel_x-filter" and models[0].params == run.data.params
    # only the final metrics are the model's, each once (not step 0's random kernel)
    keys = [m.key for m in models[0].metrics]
    assert len(keys) == len(set(keys)), keys
    last = {m.key: m for m in models[0].metrics}
    epochs = json.loads((ws.root / "metrics/train.json").read_text())["epochs"]
    assert last["kernel_rel_error"].step == epochs
    assert last["kernel_rel_error"].value == pytest.approx(run.data.metrics["kernel_rel_error"])
    assert {m.dataset_name for m in models[0].metrics} >= {"synthetic-train-64px"}
    assert "sobel_x" in models[0].tags["mlflow.note.content"]
    assert run.data.tags["converged"] == "true" and "converged" not in run.data.metrics
    versions = client.search_model_versions("name = 'sobel-filter'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert versions[0].tags["kernel"] == "sobel_x"
    assert float(versions[0].tags["kernel_rel_error"]) == pytest.approx(
        run.data.metrics["kernel_rel_error"], rel=1e-3
    )


def test_the_experiment_opens_in_the_training_view(trained):
    ws, client, run = trained
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_data_is_the_runs_dataset_input(trained):
    ws, client, run = trained
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation"}
    counts = json.loads((ws.root / "metrics/grayscale.json").read_text())
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = inputs[context]
        assert dataset.name == f"synthetic-{split}-64px" and dataset.digest
        assert json.loads(dataset.profile)["num_rows"] == counts[split]
        assert "dead_leaves" in dataset.source


def test_errors_are_also_logged_as_log10_and_the_first_image_is_at_step_0(trained):
    ws, client, run = trained
    for key in ("kernel_rel_error", "kernel_mse", "loss", "val_loss"):
        raw = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        logged = {
            m.step: m.value for m in client.get_metric_history(run.info.run_id, f"log10_{key}")
        }
        assert logged and set(logged) <= set(raw)
        for step, value in logged.items():
            assert value == pytest.approx(math.log10(raw[step]))
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "kernel_rel_error")}
    assert min(steps) == 0  # the initial kernel, before any training
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(p.startswith("images/kernel+step+0+") for p in images)


def test_only_the_params_that_apply_are_logged_and_params_yaml_is_kept(trained):
    ws, client, run = trained
    params = run.data.params
    assert params["kernel"] == "sobel_x" and params["train.max_steps"] == str(
        TINY["train"]["max_steps"]
    )
    assert not any(k.startswith(("kernels.", "mlflow.")) for k in params)
    assert "data.sha256" not in params and "data.categories" not in params
    assert params["data.count"] == "8"
    logged = client.download_artifacts(run.info.run_id, "params.yaml")
    assert yaml.safe_load(open(logged))["mlflow"]["registered_model"] == "sobel-filter"


def test_an_fft_layer_model_loads_and_predicts_where_only_mlflow_is(tmp_path, monkeypatch):
    """FFTConv2D (kernels above 11×11) travels as src/ code with the model: a process
    started outside the repository, without it on its path, loads and applies it."""
    from src import config, layers, tracking

    monkeypatch.chdir(tmp_path)  # a fresh experiment keeps its artifacts under the cwd
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.set_tracking_uri(uri)
    model = layers.build_model((13, 13), "fft", "same")
    kernel = np.random.default_rng(0).normal(size=(13, 13, 1, 1)).astype(np.float32)
    model.get_layer("conv").set_weights([kernel, np.array([0.25], np.float32)])
    x = np.random.default_rng(1).random((1, 40, 36, 1)).astype(np.float32)
    with mlflow.start_run() as run:
        model_id = tracking.start_model(run.info.run_id, config.Params(), ["random"])
        tracking.log_model(model, model_id, step=1)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, mlflow; "
        f"m = mlflow.pyfunc.load_model('runs:/{run.info.run_id}/random-filter'); "
        "np.save('y.npy', m.predict(np.load('x.npy')))"
    )
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    result = subprocess.run(
        [str(BIN / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x).numpy(), atol=1e-5)


# the README's "apply a learned filter to a photo", as it reads there
README_SNIPPET = """
import json
import os

os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow's download bars
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines,
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # the oneDNN one too
import mlflow
import numpy as np
from PIL import Image

mlflow.set_tracking_uri("sqlite:///mlflow.db")
model = mlflow.pyfunc.load_model(json.load(open("model/run.json"))["model_uri"])
photo = np.asarray(Image.open("photo.jpg").convert("L"), np.float32) / 255  # BT.601 luma
filtered = model.predict(photo[None, :, :, None])[0, :, :, 0]
"""


def test_the_readme_snippet_applies_the_filter_to_a_photo_quietly(trained):
    ws, client, run = trained
    from PIL import Image

    gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(ws.root / "photo.jpg", quality=95)
    code = README_SNIPPET + "\nnp.save('filtered.npy', filtered)\n"
    result = ws.run(str(BIN / "python"), "-c", code)
    assert result.stdout == "" and result.stderr == "", result.stderr[-2000:]
    assert np.load(ws.root / "filtered.npy").shape == (38, 48)  # valid 3×3


def conv_model(kernel: np.ndarray):
    """A real Keras Conv2D of the kernel's (kh, kw, C, F), as src/layers.py builds one."""
    import keras

    kh, kw, channels, filters = kernel.shape
    model = keras.Sequential(
        [keras.Input((None, None, channels)), keras.layers.Conv2D(filters, (kh, kw), name="conv")]
    )
    model.get_layer("conv").set_weights(
        [kernel.astype(np.float32), np.full(filters, 0.5, np.float32)]
    )
    return model


@pytest.fixture(scope="module")
def colour_bank(tmp_path_factory):
    """A 3-channel, 2-filter Conv2D logged as stages/train.py logs it, and loaded back."""
    from src import config, tracking

    root = tmp_path_factory.mktemp("bank")
    uri = f"sqlite:///{root / 'store.db'}"
    mlflow.set_tracking_uri(uri)
    kernel = np.random.default_rng(2).normal(size=(5, 5, 3, 2))
    model = conv_model(kernel)
    experiment = MlflowClient(uri).create_experiment(
        "bank", artifact_location=(root / "a").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        model_id = tracking.start_model(run.info.run_id, config.Params(), ["red", "green"])
        info = tracking.log_model(model, model_id, step=1)
    return model, mlflow.pyfunc.load_model(info.model_uri)


def test_a_colour_bank_predicts_silently_what_keras_does(colour_bank, capfd):
    model, pyfunc = colour_bank
    x = np.random.default_rng(3).random((2, 20, 17, 3)).astype(np.float32)
    capfd.readouterr()
    y = pyfunc.predict(x)
    assert capfd.readouterr().out == ""  # no Keras progress bar
    assert y.shape == (2, 16, 13, 2)
    np.testing.assert_allclose(y, model(x).numpy(), atol=1e-5)
    signature = pyfunc.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, -1, -1, 3)
    assert signature.outputs.inputs[0].shape == (-1, -1, -1, 2)


@pytest.mark.parametrize(
    "shape, says",
    [
        ((0, 64, 64, 3), "got an empty batch (shape (0, 64, 64, 3))"),
        ((1, 0, 0, 3), "got 0×0 images, smaller than the 5×5 kernel"),
        ((1, 4, 9, 3), "got 4×9 images, smaller than the 5×5 kernel"),
        ((1, 9, 9, 1), "got 1 channels (shape (1, 9, 9, 1))"),
        ((9, 9, 3), "got an array of shape (9, 9, 3)"),
    ],
    ids=["empty-batch", "zero-size", "smaller-than-the-kernel", "one-channel", "no-batch"],
)
def test_an_input_the_model_cant_take_is_one_clear_line(colour_bank, shape, says):
    from mlflow.exceptions import MlflowException

    model, pyfunc = colour_bank
    with pytest.raises(MlflowException) as error:
        pyfunc.predict(np.zeros(shape, np.float32))
    message = str(error.value)
    assert "\n" not in message and error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message.startswith("this model takes a batch of float32 images shaped (N, H, W, 3)")
    assert "H >= 5, W >= 5" in message and "(N, H', W', 2)" in message and says in message


def test_no_chart_is_a_single_dot_and_the_outcome_is_tags(trained):
    """Issue 21, item 3: converged, elapsed_s and kernel_change were one dot at step 1.
    MLflow draws a metric whose points are all at step 0 as a bar per run; any other
    has a line of at least two points."""
    ws, client, run = trained
    dots = {}
    for key in run.data.metrics:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        if steps != [0] and len(steps) < 2:
            dots[key] = steps
    assert dots == {}
    for key in ("epochs", "train_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0]
    assert run.data.tags["converged"] == "true" and "converged" not in run.data.metrics
    assert "log10_newton_step" in run.data.metrics
