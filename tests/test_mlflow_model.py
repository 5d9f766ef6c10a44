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


def held_out(ws) -> tuple[np.ndarray, np.ndarray]:
    """The first validation image and its target, as the filter stage wrote them."""
    split = pd.read_csv(ws.root / "data/gray/index.csv")["split"].tolist()
    row = split.index("val")
    gray = np.load(ws.root / "data/gray/images.npy")[row]
    target = np.load(ws.root / "data/filtered/targets.npy")[row]
    return gray[None, :, :, None].astype(np.float32), target


def test_pyfunc_predicts_the_filter_stage_target(trained, monkeypatch):
    ws, client, run = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.tracking_uri)
    mlflow.set_tracking_uri(ws.tracking_uri)
    x, target = held_out(ws)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    prediction = np.asarray(model.predict(x))[0, :, :, 0]
    assert run.data.metrics["kernel_rel_error"] < 1e-10  # learned: float32 tolerance applies
    assert prediction.shape == target.shape
    np.testing.assert_allclose(prediction, target, rtol=1e-4, atol=1e-5)


def test_mlflow_models_predict_on_the_command_line(trained, tmp_path):
    ws, client, run = trained
    x, target = held_out(ws)
    (tmp_path / "input.json").write_text(json.dumps({"inputs": x.tolist()}))
    out = tmp_path / "out.json"
    ws.run(
        str(BIN / "mlflow"),
        "models",
        "predict",
        "-m",
        f"runs:/{run.info.run_id}/model",
        "-i",
        str(tmp_path / "input.json"),
        "-t",
        "json",
        "-o",
        str(out),
        "--env-manager",
        "local",
        env=clean_env(MLFLOW_TRACKING_URI=ws.tracking_uri),
    )
    predictions = json.loads(out.read_text())["predictions"]
    prediction = np.asarray(predictions, dtype=np.float32)[0, :, :, 0]
    np.testing.assert_allclose(prediction, target, rtol=1e-4, atol=1e-5)


def test_the_model_is_a_logged_model_with_its_metrics_and_a_registered_version(trained):
    ws, client, run = trained
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    # the last epoch's metrics are the model's (MLflow also links the run's earlier ones)
    last = {m.key: m for m in sorted(models[0].metrics, key=lambda m: m.step)}
    epochs = json.loads((ws.root / "metrics/train.json").read_text())["epochs"]
    assert last["kernel_rel_error"].step == epochs
    assert last["kernel_rel_error"].value == pytest.approx(run.data.metrics["kernel_rel_error"])
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
        model_id = tracking.start_model(run.info.run_id)
        tracking.log_model(model, x[:, :24, :24], model_id, config.Params(), 0.0)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, mlflow; "
        f"m = mlflow.pyfunc.load_model('runs:/{run.info.run_id}/model'); "
        "np.save('y.npy', m.predict(np.load('x.npy')))"
    )
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    result = subprocess.run(
        [str(BIN / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x).numpy(), atol=1e-5)
