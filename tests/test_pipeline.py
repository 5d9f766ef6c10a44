"""End to end: the real `dvc repro`, `dvc exp run` (workspace, --temp, queued) and MLflow,
in a temporary git copy of the repo on a tiny config (8 images of 64×64, at most 40 steps)."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from conftest import TINY, clean_env, ran_stages
from mlflow import MlflowClient
from PIL import Image

MAX_STEPS = TINY["train"]["max_steps"]
ALL_STAGES = ["download", "grayscale", "filter", "train", "visualize"]


def runs(ws, experiment="learn-linear-filter"):
    client = MlflowClient(ws.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, "no MLflow experiment was created"
    return client, found, client.search_runs([found.experiment_id], order_by=["start_time ASC"])


def assert_complete(client, run):
    """A finished run: per-epoch metrics from step 0 (the initial kernel's errors) or 1
    (the losses), and kernel snapshots, pictures and errors, at optimizer steps from 0."""
    assert run.info.status == "FINISHED"
    run_id = run.info.run_id
    epochs = len(client.get_metric_history(run_id, "loss"))
    assert epochs >= 1
    history = client.get_metric_history(run_id, "kernel_mse")
    assert sorted(m.step for m in history) == list(range(0, epochs + 1))
    rel_error = client.get_metric_history(run_id, "kernel_rel_error")
    assert sorted(m.step for m in rel_error) == list(range(0, epochs + 1))
    for key in ("loss", "val_loss", "newton_step"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), key
    for key in ("elapsed_s", "steps"):  # from step 0, before training: no single dots
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(0, epochs + 1)), key
    by_step = client.get_metric_history(run_id, "kernel_rel_error_by_step")
    steps = sorted(m.step for m in by_step)
    last = int(client.get_metric_history(run_id, "steps")[-1].value)
    assert steps[0] == 0 and steps[-1] == last and len(steps) == len(set(steps))
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    pictured = {int(p.split("+step+")[1].split("+")[0]) for p in images if "kernel+step+" in p}
    assert pictured == set(steps), "a picture at every snapshot step"
    assert run.data.tags["converged"] in ("true", "false")
    return history


def test_repro_runs_every_stage_and_logs_one_run(workspace):
    out = workspace.dvc("repro").stdout
    assert ran_stages(out) == ["fingerprint", *ALL_STAGES]

    gray = np.load(workspace.root / "data/gray/images.npy", mmap_mode="r")
    assert gray.shape == (8, 64, 64, 1) and gray.dtype == np.float32
    targets = np.load(workspace.root / "data/filtered/targets.npy", mmap_mode="r")
    assert targets.shape == (8, 62, 62, 1)  # (N, H', W', F)
    metrics = json.loads((workspace.root / "metrics/train.json").read_text())
    assert metrics["converged"] is True and metrics["kernel_rel_error"] < 1e-6
    assert 1 <= metrics["epochs"] and metrics["steps"] <= MAX_STEPS

    client, experiment, found = runs(workspace)
    assert len(found) == 1
    history = assert_complete(client, found[0])
    assert history[-1].value < history[0].value  # the kernel error falls
    run = found[0]
    assert run.data.tags["kernel"] == "sobel_x"
    assert run.data.params["train.max_steps"] == str(MAX_STEPS)
    assert run.data.tags["converged"] == "true"
    assert experiment.artifact_location.startswith((workspace.root / "mlartifacts").as_uri())

    # a no-op repro runs none of the five stages and logs nothing
    again = workspace.dvc("repro").stdout
    assert ran_stages_of_five(again) == []
    assert len(runs(workspace)[2]) == 1


def ran_stages_of_five(output: str) -> list[str]:
    """The pipeline's five stages that ran: the fingerprint stage runs on every repro."""
    return [stage for stage in ran_stages(output) if stage in ALL_STAGES]


def test_editing_a_file_kernel_reruns_filter_and_later_only(workspace):
    path = workspace.root / "my_kernel.npy"
    np.save(path, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64))
    workspace.set_params({"kernel": "file:my_kernel.npy"})
    workspace.dvc("repro")
    workspace.commit("a file: kernel")

    edited = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    np.save(path, edited)
    # `dvc status` runs no code, so the fingerprint stage has to run first to show the change
    workspace.dvc("repro", "fingerprint")
    status = workspace.dvc("status").stdout
    assert "filter:" in status and "data/fingerprints/kernel.json" in status, status
    assert "download:" not in status and "grayscale:" not in status, status

    ran = ran_stages_of_five(workspace.dvc("repro").stdout)
    assert ran == ["filter", "train", "visualize"]
    kernel = np.load(workspace.root / "data/filtered/kernel.npy")  # (kh, kw, C, F)
    np.testing.assert_array_equal(kernel, edited[..., None, None])
    assert ran_stages_of_five(workspace.dvc("repro").stdout) == []


def write_photos(folder, first: int, count: int) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i:02d}.png")


def manifest_names(ws) -> list[str]:
    with open(ws.root / "data/raw/manifest.csv", newline="") as handle:
        return [row["name"] for row in csv.DictReader(handle)]


def test_adding_photos_to_a_source_folder_reruns_download(workspace, tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 0, 6)
    workspace.set_params({"data": {"source": str(photos)}})
    workspace.dvc("repro")
    workspace.commit("a folder source")
    assert len(manifest_names(workspace)) == 6

    write_photos(photos, 6, 3)
    ran = ran_stages_of_five(workspace.dvc("repro").stdout)
    assert ran == ALL_STAGES
    assert manifest_names(workspace) == [f"photo_{i:02d}.png" for i in range(9)]
    assert np.load(workspace.root / "data/gray/images.npy", mmap_mode="r").shape == (9, 64, 64, 1)
    assert ran_stages_of_five(workspace.dvc("repro").stdout) == []


def test_changing_the_kernel_reruns_filter_and_later_only(workspace):
    workspace.dvc("repro")
    workspace.commit("first run")
    out = workspace.dvc("exp", "run", "-S", "kernel=sobel_y").stdout
    ran = ran_stages(out)
    assert "filter" in ran and "train" in ran
    assert "download" not in ran and "grayscale" not in ran
    kernel = np.load(workspace.root / "data/filtered/kernel.npy")
    sobel_y = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    np.testing.assert_array_equal(kernel, sobel_y[..., None, None])  # (kh, kw, C, F)


def test_workspace_temp_and_queued_experiments_share_one_store(workspace):
    workspace.dvc("repro")
    workspace.commit("baseline")
    workspace.dvc("exp", "run", "-S", "kernel=sobel_y")
    workspace.dvc("exp", "run", "--temp", "-S", "kernel=prewitt_x")
    workspace.dvc("exp", "run", "--queue", "-S", "kernel=laplacian", "-n", "queued-lap")
    workspace.dvc("queue", "start", "-j", "1")
    _wait_for_queue(workspace)

    client, experiment, found = runs(workspace)
    kernels = sorted(r.data.tags["kernel"] for r in found)
    assert kernels == ["laplacian", "prewitt_x", "sobel_x", "sobel_y"]
    for run in found:
        assert_complete(client, run)
        # artifacts live under the main root, not in the deleted experiment copies
        local = client.download_artifacts(run.info.run_id, "learned_kernel.npy")
        assert np.load(local).shape == (3, 3, 1, 1)
    assert not list((workspace.root / ".dvc/tmp/exps").glob("tmp*"))
    queued = next(r for r in found if r.data.tags["kernel"] == "laplacian")
    assert queued.data.tags["dvc.exp_name"] == "queued-lap"
    assert "queued-lap" in queued.info.run_name and "laplacian" in queued.info.run_name


def _wait_for_queue(ws, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = ws.dvc("queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            assert "Failed" not in status, status
            return status
        time.sleep(3)
    raise AssertionError(f"queue did not finish:\n{status}")


def test_two_parallel_queued_experiments_on_a_fresh_store(workspace):
    """`dvc queue start -j 2` with no mlflow.db yet: both runs land, nothing lost."""
    workspace.dvc("exp", "run", "--queue", "-S", "kernel=sobel_x", "-n", "par-x")
    workspace.dvc("exp", "run", "--queue", "-S", "kernel=sobel_y", "-n", "par-y")
    assert not (workspace.root / "mlflow.db").exists()
    workspace.dvc("queue", "start", "-j", "2")
    _wait_for_queue(workspace)
    client, _, found = runs(workspace)
    assert sorted(r.data.tags["dvc.exp_name"] for r in found) == ["par-x", "par-y"]
    for run in found:
        assert_complete(client, run)


def test_a_queued_experiment_runs_its_own_copy_of_the_code(workspace):
    source = workspace.root / "src/training/loop.py"
    original = source.read_text()
    marker = "queued-code-marker-5521"
    seeding = "    keras.utils.set_random_seed(seed)\n"
    source.write_text(original.replace(seeding, f'    log.info("{marker}")\n' + seeding, 1))
    assert marker in source.read_text()
    workspace.dvc("exp", "run", "--queue", "-n", "marked")
    source.write_text(original)  # the workspace no longer has the marker
    workspace.dvc("queue", "start", "-j", "1")
    _wait_for_queue(workspace)
    logs = workspace.dvc("queue", "logs", "marked").stdout
    assert marker in logs
    assert marker not in source.read_text()


@pytest.mark.mlflow_server
def test_the_pipeline_logs_to_a_real_tracking_server(workspace, mlflow_server):
    """MLFLOW_TRACKING_URI=http://…: train and visualize log to the server, not to mlflow.db."""
    workspace.dvc("repro", env=clean_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert not (workspace.root / "mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("learn-linear-filter")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1
    assert_complete(client, found[0])
    figures = [a.path for a in client.list_artifacts(found[0].info.run_id, "figures")]
    assert "figures/convergence.gif" in figures


def test_a_run_stopped_by_its_cap_warns_and_records_converged_false(workspace):
    result = workspace.dvc("exp", "run", "-S", "train.max_steps=3")
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert warnings[0].startswith("train: warning: not converged: stopped at train.max_steps=3")
    assert warnings[0].endswith("; raise train.max_steps")
    metrics = json.loads((workspace.root / "metrics/train.json").read_text())
    assert metrics["converged"] is False and metrics["steps"] == 3 and metrics["epochs"] == 1
    client, _, found = runs(workspace)
    assert [r.data.tags["converged"] for r in found] == ["false"]
    by_step = client.get_metric_history(found[0].info.run_id, "kernel_rel_error_by_step")
    assert sorted(m.step for m in by_step) == [0, 1, 2, 3]


def test_the_gif_shows_the_kernel_from_step_0_one_distinct_frame_per_snapshot(workspace):
    workspace.set_params({"train": {"min_epoch_steps": 16}})  # 16 steps or more
    workspace.dvc("repro")
    with open(workspace.root / "metrics/steps.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps[0] == 0 and len(steps) >= 15
    gif = Image.open(workspace.root / "figures/convergence.gif")
    frames = []
    for index in range(gif.n_frames):
        gif.seek(index)
        frames.append(np.asarray(gif.convert("RGB")))
    assert len(frames) == len(steps)
    assert len({frame.tobytes() for frame in frames}) == len(frames), "every frame differs"
    # the kernel half of the first two frames differs: the initial weights, then a step
    assert np.any(
        frames[0][:, : frames[0].shape[1] // 2] != frames[1][:, : frames[1].shape[1] // 2]
    )
