"""src/tracking.py against real MLflow: a SQLite store in tmp_path, parallel
processes on a fresh store, and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy
import yaml
from conftest import clean_env, free_port, merge
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from src import config, figures, paths, tracking
from src.errors import UserError
from src.tracking import log_epoch, log_final, resume_run, training_run

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "tracking-test"
SOBEL_RANGE = (-2.0, 2.0)


def make_params(experiment: str = EXPERIMENT, **data) -> config.Params:
    return config.parse(
        {
            "kernel": "sobel_x",
            "seed": 3,
            "kernels": {"gaussian": {"size": 7, "covariance": None}},
            "data": {"categories": [], **data},
            "train": {"max_steps": 3, "learning_rate": 0.01},
            "mlflow": {"experiment": experiment},
        }
    )


def kernel_images(client: MlflowClient, run_id: str) -> list[str]:
    return [
        f.path
        for f in client.list_artifacts(run_id, "images")
        if Path(f.path).name.startswith("kernel+step+") and f.path.endswith(".png")
    ]


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store with DVC_ROOT = tmp_path, as `dvc exp run` would set it."""
    for var in (
        "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def test_param_values_are_strings_that_fit_mlflow():
    values = tracking.run_params(make_params(source="/" + "x" * 7000))
    assert values["data.source"] == ("/" + "x" * 7000)[:6000]
    assert values["train.max_steps"] == "3" and values["filter.noise_std"] == "0.0"


# --- runs on a SQLite store -----------------------------------------------------


def test_samples_datasets_name_scikit_image_not_a_folder(store):
    params = make_params(source="samples")
    index = pd.DataFrame({"name": ["astronaut.png", "camera.png"], "split": ["train", "val"]})
    with training_run(params) as run_id:
        tracking.log_datasets(params, index, run_id)
    inputs = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
    datasets = sorted((i.dataset for i in inputs), key=lambda d: d.name)
    assert [d.name for d in datasets] == ["samples-train-256px", "samples-val-256px"]
    assert {d.source_type for d in datasets} == {"code"}
    tags = json.loads(datasets[0].source)["tags"]
    assert tags == {"photos": "skimage/data", "scikit-image": version("scikit-image")}


@pytest.mark.parametrize("in_dvc_exp", [True, False], ids=["dvc-exp", "workspace"])
def test_run_has_name_tags_and_flattened_params(store, tmp_path, monkeypatch, in_dvc_exp):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "base"], check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if in_dvc_exp:
        monkeypatch.setenv("DVC_EXP_NAME", "brisk-lamb")
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    params = make_params()

    with training_run(params) as run_id:
        pass

    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == ("sobel_x-brisk-lamb" if in_dvc_exp else "sobel_x-workspace")
    assert {k: run.data.tags[k] for k in tracking.run_tags(params)} == {
        "kernel": "sobel_x",
        "dvc.exp_name": "brisk-lamb" if in_dvc_exp else "workspace",
        "dvc.baseline_rev": "0123abc" if in_dvc_exp else head,
        "git_commit": head,
        "data.source": "synthetic",
    }
    assert run.data.params == tracking.run_params(params)
    assert run.data.params["train.max_steps"] == "3"
    client = MlflowClient(store)
    logged = yaml.safe_load(open(client.download_artifacts(run_id, "params.yaml")))
    assert logged == params.model_dump(mode="json")  # all of it, as an artifact


@pytest.mark.parametrize(
    "changes, kept, dropped",
    [
        ({"kernel": "smiley"}, ["kernel", "data.count"], ["kernels.", "mlflow.", "data.sha256"]),
        (
            {"kernel": "gaussian"},
            ["kernels.gaussian.size", "kernels.gaussian.sigma"],
            ["kernels.box.", "kernels.gaussian.covariance"],
        ),
        (
            {"kernel": "gaussian", "kernels": {"gaussian": {"covariance": [[2, 1], [1, 2]]}}},
            ["kernels.gaussian.covariance"],
            ["kernels.gaussian.sigma"],
        ),
        ({"kernel": "box"}, ["kernels.box.size"], ["kernels.gaussian."]),
        (
            {"data": {"source": "mit_scenes", "categories": ["street"], "sha256": "a" * 64}},
            ["data.categories", "data.sha256"],
            ["data.count"],
        ),
    ],
)
def test_only_the_params_that_apply_to_the_run_are_logged(changes, kept, dropped):
    params = config.parse(merge(config.Params().model_dump(mode="json"), changes))
    logged = tracking.run_params(params)
    for key in kept:
        assert key in logged, key
    for prefix in dropped:
        assert not any(k.startswith(prefix) for k in logged), prefix
    assert logged["train.learning_rate"] == "0.8" and logged["filter.padding"] == "valid"


def test_epochs_and_final_artifacts(store, tmp_path):
    params = make_params()
    true_kernel = params.true_kernel()
    with training_run(params) as run_id:
        for epoch in (1, 2, 3):
            learned = true_kernel * epoch / 3
            log_epoch(run_id, epoch, {"loss": 1.0 / epoch, "val_loss": np.float32(2.0 / epoch)})
            tracking.log_snapshots(run_id, [(epoch * 10, learned)], true_kernel, SOBEL_RANGE)
        log_final(run_id, true_kernel=true_kernel, learned_kernel=learned)

    client = MlflowClient(store)
    for key in ("loss", "val_loss"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3]
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")}[2] == 0.5
    log10 = {m.step: m.value for m in client.get_metric_history(run_id, "log10_val_loss")}
    assert log10 == pytest.approx({e: np.log10(2.0 / e) for e in (1, 2, 3)}, rel=1e-6)
    assert len(kernel_images(client, run_id)) == 3
    by_step = {
        m.step: m.value for m in client.get_metric_history(run_id, "kernel_rel_error_by_step")
    }
    assert by_step == pytest.approx({10: 4 / 9, 20: 1 / 9, 30: 0.0}), "at the optimizer steps"

    artifacts = tmp_path / "mlartifacts" / EXPERIMENT / run_id / "artifacts"
    assert client.get_run(run_id).info.artifact_uri == artifacts.as_uri()
    for name in ("true_kernel.png", "learned_kernel.png"):
        assert (artifacts / name).is_file(), name
    np.testing.assert_array_equal(np.load(artifacts / "learned_kernel.npy"), learned)
    np.testing.assert_array_equal(np.load(artifacts / "true_kernel.npy"), true_kernel)


def test_resume_run_adds_to_the_same_run(store, tmp_path):
    params = make_params()
    with training_run(params) as run_id:
        pass
    figure = tmp_path / "kernel.gif"
    figure.write_bytes(b"GIF89a")

    with resume_run(run_id) as resumed:
        assert resumed == run_id
        mlflow.log_artifact(str(figure), "figures")  # fluent: goes to the resumed run
    with pytest.raises(RuntimeError):
        with resume_run(run_id):
            raise RuntimeError("visualize broke")

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"  # training's status, kept
    assert [f.path for f in client.list_artifacts(run_id, "figures")] == ["figures/kernel.gif"]
    assert mlflow.active_run() is None


def test_resume_run_of_an_unknown_run_is_a_user_error(store):
    with training_run(make_params()):
        pass
    with pytest.raises(UserError, match="dvc repro -f train"):
        with resume_run("0" * 32):
            pytest.fail("resumed a run that does not exist")


@pytest.mark.parametrize("dvc_root_set", [True, False], ids=["DVC_ROOT", "cwd-only"])
def test_artifacts_stay_under_the_main_root_from_an_experiment_copy(
    store, tmp_path, monkeypatch, dvc_root_set
):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    if not dvc_root_set:  # run by hand inside the copy: the default store must still be the root's
        monkeypatch.delenv("DVC_ROOT")
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params = make_params()

    with training_run(params) as run_id:
        log_epoch(run_id, 1, {"loss": 1.0})
        tracking.log_snapshots(
            run_id, [(1, params.true_kernel())], params.true_kernel(), SOBEL_RANGE
        )

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / EXPERIMENT).as_uri()
    assert len(kernel_images(client, run_id)) == 1
    assert (tmp_path / "mlartifacts" / EXPERIMENT / run_id / "artifacts" / "images").is_dir()
    assert sorted(p.name for p in copy.iterdir()) == []  # nothing written into the copy


# --- where the store and the artifacts are ---------------------------------------


@pytest.mark.parametrize("relative", ["mlflow.db", "stores/mine.db"])
def test_a_relative_sqlite_uri_is_the_main_roots_from_any_cwd(
    store, tmp_path, monkeypatch, relative
):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"  # a --temp run's cwd
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{relative}")  # MLflow's documented form
    root_store = f"sqlite:///{tmp_path / relative}"
    assert paths.tracking_uri() == root_store

    with training_run(make_params()) as run_id:
        pass

    assert MlflowClient(root_store).get_run(run_id).info.status == "FINISHED"
    assert sorted(p.name for p in copy.iterdir()) == []  # nothing written into the copy


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////{tmp}/elsewhere/mlflow.db",
        "sqlite:///:memory:",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com/prefix",
        "databricks",
        "postgresql://user@db.example.com/mlflow",
    ],
)
def test_absolute_and_server_uris_are_used_as_given(store, tmp_path, monkeypatch, uri):
    uri = uri.format(tmp=str(tmp_path).lstrip("/"))
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert paths.tracking_uri() == uri


def test_a_temp_experiment_with_a_relative_sqlite_uri_logs_to_the_roots_store(workspace):
    """`MLFLOW_TRACKING_URI=sqlite:///mlflow.db dvc exp run --temp`: the run is in the
    root's mlflow.db, not in the experiment copy that DVC deletes."""
    env = clean_env(MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    workspace.dvc("exp", "run", "--temp", "-S", "kernel=sobel_y", env=env)

    client = MlflowClient(workspace.tracking_uri)
    experiment = client.get_experiment_by_name("learn-linear-filter")
    assert experiment is not None, "the run is not in the root's mlflow.db"
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kernel"] == "sobel_y"
    learned = client.download_artifacts(run.info.run_id, "learned_kernel.npy")
    assert np.load(learned).shape == (3, 3, 1, 1)  # (kh, kw, C, F)
    assert experiment.artifact_location.startswith((workspace.root / "mlartifacts").as_uri())


@pytest.mark.parametrize(
    "name",
    ["../../escape", "/{tmp}/abs/path", "a/b", "..", "my experiment", "фильтр ✓", "e" * 300],
    ids=["dotdot", "absolute", "slash", "parent", "space", "unicode", "long"],
)
def test_any_experiment_name_keeps_its_artifacts_under_mlartifacts(store, tmp_path, name):
    name = name.format(tmp=str(tmp_path).lstrip("/"))
    params = make_params(experiment=name)
    with training_run(params) as run_id:
        kernel = params.true_kernel()
        log_final(run_id, true_kernel=kernel, learned_kernel=kernel)

    experiment = MlflowClient(store).get_experiment_by_name(name)
    location = Path(url2pathname(urlparse(experiment.artifact_location).path)).resolve()
    assert location.parent == tmp_path / "mlartifacts"
    assert (location / run_id / "artifacts" / "learned_kernel.npy").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlartifacts",
        "mlflow.db",
        "mlflow.db.lock",
    ]


def test_another_experiment_name_gets_its_own_folder(store, tmp_path):
    """Plain names keep mlartifacts/<name> (existing stores); names that differ only in
    what a folder name can't hold still get different folders."""
    for name in ("learn-linear-filter", "a/b", "a b", "a_b"):
        with training_run(make_params(experiment=name)):
            pass
    client = MlflowClient(store)
    locations = {n: client.get_experiment_by_name(n).artifact_location for n in ("a/b", "a b")}
    assert len(set(locations.values())) == 2
    assert (
        client.get_experiment_by_name("learn-linear-filter").artifact_location
        == (tmp_path / "mlartifacts" / "learn-linear-filter").as_uri()
    )
    assert (
        client.get_experiment_by_name("a_b").artifact_location
        == (tmp_path / "mlartifacts" / "a_b").as_uri()
    )


# --- parallel runs: `dvc queue start -j 3` on a fresh store ---------------------

WORKER = """
import sys, time
from pathlib import Path
from src import config, paths, tracking
ready, go = map(Path, sys.argv[1:])
ready.touch()  # imports done: start the store work together
while not go.exists():
    time.sleep(0.002)
params = config.parse({"kernel": "sobel_x", "mlflow": {"experiment": "parallel"}})
kernel = params.true_kernel()
with tracking.training_run(params) as run_id:
    for epoch in range(1, 21):
        tracking.log_epoch(run_id, epoch, {"loss": 1.0 / epoch, "val_loss": 2.0 / epoch})
        tracking.log_snapshots(run_id, [(epoch, kernel * epoch / 20)], kernel, (-2.0, 2.0))
"""


def test_parallel_runs_on_a_fresh_store(store, tmp_path):
    workers, go = 3, tmp_path / "go"
    procs = []
    for i in range(workers):
        env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_EXP_NAME": f"exp-{i}"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(tmp_path / f"ready-{i}"), str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(workers)):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        assert not (tmp_path / "mlflow.db").exists()
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * workers, [err for _, err in results]

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"sobel_x-exp-{i}" for i in range(workers)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        for key in ("loss", "val_loss"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, 21))
        assert len(kernel_images(client, run.info.run_id)) == 20


# --- a real tracking server -----------------------------------------------------


@pytest.mark.mlflow_server
def test_tracking_server(store, tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = make_params()

    with training_run(params) as run_id:
        log_epoch(run_id, 1, {"loss": 0.25})
        tracking.log_snapshots(
            run_id, [(1, params.true_kernel())], params.true_kernel(), SOBEL_RANGE
        )

    client = MlflowClient(mlflow_server)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.25)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(kernel_images(client, run_id)) == 1
    # the server, not the client, decides where a server's artifacts go
    location = client.get_experiment_by_name(EXPERIMENT).artifact_location
    assert location.startswith(str(tmp_path / "art")), location


@pytest.mark.parametrize("server", ["closed-port", "silent"])
def test_unreachable_server_fails_fast(store, monkeypatch, server):
    with socket.socket() as silent:  # accepts connections into its backlog, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1] if server == "silent" else free_port()
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        start = time.monotonic()
        with pytest.raises(UserError, match="MLFLOW_TRACKING_URI") as error:
            with training_run(make_params()):
                pytest.fail("trained without a tracking server")
    assert time.monotonic() - start < 10
    assert f"MLflow server {url} is not reachable" in str(error.value)


class NotMlflow(http.server.SimpleHTTPRequestHandler):
    """`python -m http.server`: GET of MLflow's API is 404, POST is 501."""

    def log_message(self, *args):
        pass


class Answers401(NotMlflow):
    def do_POST(self):
        self.send_error(401, "login first")

    do_GET = do_POST


@pytest.mark.parametrize(
    "handler, says",
    [(NotMlflow, "is not an MLflow tracking server"), (Answers401, "refuses access")],
    ids=["http.server", "401"],
)
def test_a_server_that_is_not_mlflow_is_not_called_unreachable(store, monkeypatch, handler, says):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        with pytest.raises(UserError) as error:
            with training_run(make_params()):
                pytest.fail("trained without an MLflow server")
    finally:
        server.shutdown()
        server.server_close()
    message = str(error.value)
    assert f"{url} answers, but {says}" in message
    assert "MLFLOW_TRACKING_URI" in message and "not reachable" not in message
    assert "\n" not in message


# --- store problems -------------------------------------------------------------


def test_old_schema_asks_for_db_upgrade(store, tmp_path):
    db = tmp_path / "mlflow.db"
    # A current schema made outside MLflow's per-URI store cache, then marked as older.
    # (A database that lacks newer tables is migrated by MLflow itself, silently.)
    SqlAlchemyStore(store, (tmp_path / "unused").as_uri())
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '0c779009ac13'")
    con.close()

    with pytest.raises(UserError, match="mlflow db upgrade") as error:
        with training_run(make_params()):
            pytest.fail("trained on an old schema")
    assert f"`mlflow db upgrade {store}`" in str(error.value)
    assert "\n" not in str(error.value)


def _unusable_sqlite_path(tmp_path: Path, case: str) -> Path:
    if case == "directory":
        (tmp_path / "mlflow.db").mkdir()
        return tmp_path / "mlflow.db"
    if case == "parent-is-a-file":
        (tmp_path / "notes.txt").write_text("a file")
        return tmp_path / "notes.txt" / "mlflow.db"
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        return tmp_path / "locked" / "mlflow.db"
    if Path("/sys").is_dir():  # sysfs refuses new files even to root, whom modes don't stop
        return Path("/sys/mlflow.db")
    pytest.skip("running as root, and no folder that root can't write to")


@pytest.mark.parametrize("case", ["directory", "parent-is-a-file", "parent-not-writable"])
def test_an_unusable_sqlite_path_fails_in_seconds(store, tmp_path, monkeypatch, case):
    """MLflow retries an unopenable SQLite file for about 100 s, warning ~40 times."""
    db = _unusable_sqlite_path(tmp_path, case)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        with training_run(make_params()):
            pytest.fail("trained on an unusable store")
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert message.startswith(f"MLflow store {uri} can't be used: ")
    assert "MLFLOW_TRACKING_URI" in message and "\n" not in message


@pytest.mark.parametrize(
    "stop, status",
    [(KeyboardInterrupt, "KILLED"), (signal.SIGTERM, "KILLED"), (RuntimeError, "FAILED")],
)
def test_run_status_when_training_stops(store, stop, status):
    sigterm_before = signal.getsignal(signal.SIGTERM)
    started = []
    with pytest.raises(RuntimeError if status == "FAILED" else KeyboardInterrupt):
        with training_run(make_params()) as run_id:
            started.append(run_id)
            if stop is signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                pytest.fail("SIGTERM did not interrupt the run")
            raise stop("stopped")

    assert MlflowClient(store).get_run(started[0]).info.status == status
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, also when pytest was started with SIGINT ignored
    (a background job of a script, some CI runners): then Python installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_inside_a_store_write_waits_for_it_and_the_run_is_killed(
    store, signum, sigint_as_in_a_terminal
):
    """The signal arrives while log_epoch's metric INSERT runs. Raised there, it
    would leave the transaction open and the database locked, and marking the
    run KILLED would fail; held back, the write completes and the run is KILLED."""
    sigint_before, sigterm_before = map(signal.getsignal, (signal.SIGINT, signal.SIGTERM))
    sent = []

    def interrupt_the_insert(conn, cursor, statement, *args):
        if not sent and statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            sent.append(statement)
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # Python runs the handler here, inside the write

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt_the_insert)
    try:
        with pytest.raises(KeyboardInterrupt):
            with training_run(make_params()) as run_id:
                log_epoch(run_id, 1, {"kernel_mse": 0.5})
                pytest.fail("the interrupt was not delivered after the write")
    finally:
        sqlalchemy.event.remove(
            sqlalchemy.engine.Engine, "before_cursor_execute", interrupt_the_insert
        )

    assert sent, "no metric INSERT ran"
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "KILLED"
    # the interrupted write completed
    assert run.data.metrics == {"kernel_mse": 0.5, "log10_kernel_mse": pytest.approx(-0.30103)}
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGINT) is sigint_before
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


def test_experiments_open_in_the_training_view_new_ones_and_old_ones(store, tmp_path):
    client = MlflowClient(store)
    made_before = client.create_experiment(EXPERIMENT, artifact_location=tmp_path.as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(made_before).tags
    with training_run(make_params()):
        pass
    assert client.get_experiment(made_before).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    fresh = make_params().model_copy(update={"mlflow": config.MlflowConfig(experiment="new")})
    with training_run(fresh):
        pass
    experiment = client.get_experiment_by_name("new")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize(
    "stop, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_model_left_unfinished_by_a_stopped_run_is_marked_failed(store, stop, status):
    client = MlflowClient(store)
    with pytest.raises(type(stop)):
        with training_run(make_params()) as run_id:
            model_id = tracking.start_model(run_id)
            assert client.get_logged_model(model_id).status == LoggedModelStatus.PENDING
            raise stop
    assert client.get_run(run_id).info.status == status
    assert client.get_logged_model(model_id).status == LoggedModelStatus.FAILED


def test_the_mit_archive_pin_is_logged_only_where_it_applies():
    pinned = {"data": {"sha256": "b" * 64}}
    synthetic = config.parse(merge(config.Params().model_dump(mode="json"), pinned))
    assert "data.sha256" not in tracking.run_params(synthetic)
    pinned["data"]["source"] = "mit_scenes"
    mit = config.parse(merge(config.Params().model_dump(mode="json"), pinned))
    assert tracking.run_params(mit)["data.sha256"] == "b" * 64


# --- issue 21 and 22: what the run and its model say ------------------------------


@pytest.mark.parametrize(
    "name, says",
    [
        (".", "not read as a path"),
        ("..x", "not read as a path"),
        ("m" * 300, "at most 256 characters"),
    ],
    ids=["dot", "dotdot", "300-characters"],
)
def test_registry_names_mlflow_refuses_are_refused_at_load(name, says):
    with pytest.raises(UserError) as error:
        config.parse({"mlflow": {"registered_model": name}})
    message = str(error.value)
    assert message.startswith("mlflow.registered_model must be ") and "\n" not in message
    assert says.replace("not read", "does not read") in message or says in message
    assert len(message) < 200


def test_names_mlflow_accepts_are_accepted():
    for name in ("sobel-filter", ".x", "a..b", "m" * 256):
        assert config.parse({"mlflow": {"registered_model": name}}).mlflow.registered_model


def test_params_are_the_settings_training_used_and_the_recipe():
    original = tracking.run_params(config.parse({"train": {"recipe": "original"}}))
    assert original["train.recipe"] == "original"
    assert original["train.batch_size"] == "1" and original["train.learning_rate"] == "0.001"
    assert original["train.optimizer"] == "adam" and original["train.whiten"] == "none"
    assert original["train.crop"] == "0"
    assert "train.precondition" not in original  # K-FAC preconditions SGD only
    adam = tracking.run_params(config.parse({"train": {"optimizer": "adam"}}))
    assert "train.precondition" not in adam and adam["train.optimizer"] == "adam"
    fast = tracking.run_params(config.Params())
    assert fast["train.precondition"] == "kfac" and fast["train.recipe"] == "fast"


def test_outcome_is_tags_once_per_run_numbers_are_at_step_0(store):
    params = make_params()
    summary = {
        "converged": False,
        "stop_reason": "max_steps",
        "identifiable": True,
        "steps": 40,
        "epochs": 2,
        "kernel_rel_error": 1e-3,
        "train_seconds": 1.25,
        "lstsq_kernel_rel_error": 1e-20,
        "lstsq_seconds": 0.5,
    }
    with training_run(params) as run_id:
        log_epoch(run_id, 0, {"steps": 0, "elapsed_s": 0.0, "kernel_rel_error": 2.0})
        for epoch in (1, 2):
            log_epoch(
                run_id,
                epoch,
                {
                    "steps": 20 * epoch,
                    "converged": 0.0,  # Keras's logs hold it: a tag, not a metric
                    "kernel_rel_error": 10.0**-epoch,
                    "newton_step": 10.0 ** (-2 * epoch),
                    "crop_loss": 0.1,
                    "kernel_rel_error/sobel_x": 10.0**-epoch,
                },
            )
        tracking.log_outcome(run_id, summary)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert {k: run.data.tags[k] for k in tracking.OUTCOME_TAGS} == {
        "converged": "false",
        "stop_reason": "max_steps",
        "identifiable": "true",
    }
    assert not set(tracking.OUTCOME_TAGS) & set(run.data.metrics)
    for key in ("epochs", "train_seconds", "lstsq_kernel_rel_error", "lstsq_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0], key
    assert run.data.metrics["log10_lstsq_kernel_rel_error"] == pytest.approx(-20)
    # per-epoch ones are not logged again: each has one point an epoch, from step 0
    assert [m.step for m in client.get_metric_history(run_id, "steps")] == [0, 1, 2]
    for key in ("newton_step", "crop_loss", "kernel_rel_error", "kernel_rel_error/sobel_x"):
        assert f"log10_{key}" in run.data.metrics, key
    assert run.data.metrics["log10_newton_step"] == pytest.approx(-4)


def test_a_bank_has_an_image_key_and_errors_per_filter(store):
    rng = np.random.default_rng(0)
    true = rng.normal(size=(3, 3, 3, 2))  # 3 channels, 2 filters
    names = ["red", "green"]
    learned = true.copy()
    learned[..., 1] *= 0.5
    with training_run(make_params()) as run_id:
        ranges = figures.kernel_ranges(true)  # one (low, high) a filter, as stages/train.py
        tracking.log_snapshots(run_id, [(0, learned), (7, true)], true, ranges, names)
        log_final(run_id, true_kernel=true, learned_kernel=learned, names=names)
    client = MlflowClient(store)
    metrics = client.get_run(run_id).data.metrics
    history = client.get_metric_history(run_id, "kernel_rel_error_by_step/green")
    assert {m.step: m.value for m in history} == pytest.approx({0: 0.25, 7: 0.0})
    assert metrics["kernel_rel_error_by_step/red"] == 0.0
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    for name in names:
        pictures = [p for p in images if p.startswith(f"images/kernel~{name}+step+")]
        assert len([p for p in pictures if p.endswith(".png")]) == 2, images
    artifacts = Path(url2pathname(urlparse(client.get_run(run_id).info.artifact_uri).path))
    from PIL import Image

    with Image.open(artifacts / "learned_kernel" / "green.png") as picture:
        width, height = picture.size
    assert width > 3 * height - 1  # the three channel slices side by side
    assert np.load(artifacts / "learned_kernel.npy").shape == (3, 3, 3, 2)


def test_the_model_name_says_what_it_is():
    assert tracking.model_name(["sobel_x"]) == "sobel_x-filter"
    assert tracking.model_name(["my.kernel"]) == "my-kernel-filter"  # MLflow refuses '.'
    bank = tracking.model_name([f"filter{i:02d}" for i in range(64)])
    assert bank.startswith("filter00+filter01+") and bank.endswith(" more-filter")
    assert len(bank) <= 90


def conv_model(kernel: np.ndarray, padding: str = "valid"):
    """A real Keras Conv2D of the kernel's (kh, kw, C, F), as src/layers.py builds one."""
    import keras

    kh, kw, channels, filters = kernel.shape
    model = keras.Sequential(
        [
            keras.Input((None, None, channels)),
            keras.layers.Conv2D(filters, (kh, kw), padding=padding, name="conv"),
        ]
    )
    model.get_layer("conv").set_weights([kernel.astype(np.float32), np.zeros(filters, np.float32)])
    return model


SUMMARY = {
    "converged": True,
    "stop_reason": "optimum",
    "identifiable": True,
    "steps": 30,
    "epochs": 2,
    "kernel_rel_error": 1e-13,
    "train_seconds": 1.5,
}


def logged_run(params, kernel, names, summary=SUMMARY):
    """A training run as stages/train.py logs it, ended; returns (run_id, model_id)."""
    index = pd.DataFrame({"name": ["a.png", "b.png"], "split": ["train", "val"]})
    with training_run(params) as run_id:
        tracking.log_datasets(params, index, run_id)
        model_id = tracking.start_model(run_id, params, names)
        log_epoch(run_id, 0, {"steps": 0, "elapsed_s": 0.0, "kernel_rel_error": 2.1})
        log_epoch(
            run_id, 1, {"steps": 15, "loss": 1e-3, "val_loss": 2e-3, "kernel_rel_error": 1e-5}
        )
        last = {"steps": 30, "loss": 1e-9, "val_loss": 2e-9, "kernel_rel_error": 1e-13}
        log_epoch(run_id, 2, last, model_id)
        tracking.log_outcome(run_id, summary, model_id)
        model = conv_model(kernel)
        description = tracking.model_description(model, names, summary)
        tracking.log_model(model, model_id, step=2, description=description)
    return run_id, model_id


def test_the_model_page_shows_the_final_metrics_params_datasets_and_signature(store):
    params = make_params()
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 2))
    run_id, model_id = logged_run(params, kernel, ["red", "green"])
    client = MlflowClient(store)
    model = client.get_logged_model(model_id)
    assert model.name == "red+green-filter" and model.status == LoggedModelStatus.READY
    assert model.params == tracking.run_params(params)
    keys = [m.key for m in model.metrics]
    assert len(keys) == len(set(keys)), "each metric once"
    final = {m.key: m for m in model.metrics}
    assert final["kernel_rel_error"].value == 1e-13 and final["kernel_rel_error"].step == 2
    assert final["epochs"].step == 0 and "converged" not in final
    assert final["val_loss"].dataset_name == "synthetic-val-256px"
    assert final["loss"].dataset_name == "synthetic-train-256px"
    description = model.tags["mlflow.note.content"]
    assert "red, green" in description and "3 channel" in description and "\n" not in description
    # the signature, as MLflow reads it back: C channels in, F filters out
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.signature.inputs.inputs[0].shape == (-1, -1, -1, 3)
    assert info.signature.outputs.inputs[0].shape == (-1, -1, -1, 2)
    assert info.signature.inputs.inputs[0].type == np.dtype(np.float32)
    assert info.saved_input_example_info is None  # nothing was run to infer it
    # the run's own history is untouched: each epoch once
    assert [m.step for m in client.get_metric_history(run_id, "kernel_rel_error")] == [0, 1, 2]
    assert client.get_run(run_id).outputs.model_outputs[0].step == 2


@pytest.mark.parametrize(
    "converged, unconverged_too, registered",
    [(True, False, True), (False, False, False), (False, True, True)],
    ids=["converged", "unconverged", "unconverged-asked-for"],
)
def test_only_converged_runs_register_unless_asked(
    store, caplog, converged, unconverged_too, registered
):
    params = config.parse(
        merge(
            make_params().model_dump(mode="json"),
            {"mlflow": {"registered_model": "edge", "register_unconverged": unconverged_too}},
        )
    )
    summary = {
        **SUMMARY,
        "converged": converged,
        "stop_reason": "optimum" if converged else "max_steps",
    }
    kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 1))
    run_id, model_id = logged_run(params, kernel, ["sobel_x"], summary)
    with caplog.at_level("WARNING", logger="src.tracking"):
        version = tracking.register_model(model_id, params, summary)
    client = MlflowClient(store)
    versions = client.search_model_versions("name = 'edge'")
    if registered:
        assert version == 1 and [v.run_id for v in versions] == [run_id]
        assert versions[0].tags["converged"] == str(converged).lower()
        assert versions[0].tags["kernel_rel_error"] == "1.000e-13"
    else:
        assert version is None and versions == []
        [line] = [r.getMessage() for r in caplog.records]
        assert "did not converge (max_steps)" in line and "register_unconverged" in line


def server_process(tmp_path: Path):
    from conftest import ServerProcess

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}"]
    command += ["--default-artifact-root", str(tmp_path / "art")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return ServerProcess(command, f"http://127.0.0.1:{port}", tmp_path / "server.log", env=env)


@pytest.mark.mlflow_server
def test_a_server_killed_during_registration_fails_in_seconds_with_the_run_ended(
    store, tmp_path, monkeypatch
):
    """Issue 22, item 6: 8.5 minutes of retries, a message cut mid-word, the run left
    RUNNING with a version pointing at it. Now: the run has ended before registration."""
    server = server_process(tmp_path)
    url = server.start(timeout=60)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        params = config.parse(
            merge(make_params().model_dump(mode="json"), {"mlflow": {"registered_model": "edge"}})
        )
        kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 1))
        run_id, model_id = logged_run(params, kernel, ["sobel_x"])
        server.stop()  # killed as registration starts
        start = time.monotonic()
        with pytest.raises(UserError) as error:
            tracking.register_model(model_id, params, SUMMARY)
        seconds = time.monotonic() - start
        server.start(timeout=60)
        message = str(error.value)
        assert seconds < 30, seconds
        assert message.startswith(f"lost the MLflow server {url} while registering")
        assert "(Connection refused)" in message and "\n" not in message
        assert f"models:/{model_id}" in message  # how to register it once the server is back
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.search_model_versions("name = 'edge'") == []
    finally:
        server.stop()


@pytest.mark.mlflow_server
def test_a_4xx_answer_during_training_is_not_a_lost_server(store, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with pytest.raises(UserError) as error:
        with training_run(make_params()) as run_id:
            MlflowClient().get_run("0" * 32)  # the server answers 404
    message = str(error.value)
    assert message.startswith(f"MLflow server {mlflow_server} refused a request during training")
    assert "RESOURCE_DOES_NOT_EXIST" in message and "lost" not in message
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FAILED"
