"""Everything MLflow for the train and visualize stages.

    with tracking.training_run(params) as run_id:     # fails fast if the store is unusable
        tracking.log_datasets(params, index, run_id)
        model_id = tracking.start_model(run_id)
        for epoch in ...:                              # a Keras callback in stages/train.py
            tracking.log_epoch(run_id, epoch, {"loss": ...})
            tracking.log_snapshots(run_id, [(step, kernel), ...], true_kernel, value_range)
        tracking.log_final(run_id, true_kernel=..., learned_kernel=...)
        tracking.log_model(model, example, model_id, params, kernel_rel_error)

    with tracking.resume_run(run_id):                  # visualize: same run, no second one
        mlflow.log_artifacts("figures", artifact_path="figures")

The store is the one paths.tracking_uri() names. Two things a local store needs
that MLflow does not do by itself:
- Queued experiments run in parallel. Two processes creating a fresh SQLite
  schema at once fail (`duplicate column name: step`), so the schema and the
  experiment are made under a file lock next to the database.
- A new experiment's default artifact location is relative to the cwd, which for
  a queued run is a copy that DVC deletes. The experiment is created with its
  artifacts in paths.experiment_artifacts(name) instead. A tracking server
  decides its own artifact location.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import sqlalchemy
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus, Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT as DATASET_CONTEXT

from src import config, figures, interrupts, kernels, paths
from src.errors import UserError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5  # seconds to wait for a tracking server before giving up
LOCK_TIMEOUT = 120.0  # seconds to wait for another process creating the store
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values
EXPS_COPY = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
# The experiment's kind in MLflow 3: model training (runs, metrics, models), not GenAI
# (traces, judges). MLflow 3.17's UI still starts a fresh browser on its GenAI view: its
# switch is kept per browser (the README says so).
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# Errors span 1e-1 to 1e-17, and MLflow's charts are linear by default: these metrics
# are also logged as log10_<name>, which the default charts separate.
LOG10_METRICS = ("kernel_rel_error", "kernel_mse", "loss", "val_loss")


# --- what a run records about itself --------------------------------------------


def run_name(params: config.Params) -> str:
    return f"{params.kernel}-{os.environ.get('DVC_EXP_NAME') or 'workspace'}"


def _git_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_tags(params: config.Params) -> dict[str, str]:
    """Tags that tie the run to its DVC experiment and git commit."""
    head = _git_head()
    return {
        "kernel": params.kernel,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or head,
        "git_commit": head,
        "data.source": params.data.source,
    }


def run_params(params: config.Params) -> dict[str, str]:
    """The params that apply to this run, flattened to dotted keys, as MLflow's strings.

    Settings the run never reads are left out (the Gaussian's on a smiley run, the
    MIT archive's pin on synthetic data, where MLflow logs to); the whole
    params.yaml is logged as an artifact beside them, so nothing is lost.
    """
    doc = params.model_dump(mode="json")
    data = doc["data"]
    if params.data.source != "synthetic":
        data.pop("count")
    if params.data.source != "mit_scenes":
        data.pop("categories")
    if params.data.source != "mit_scenes" or not params.data.sha256:
        data.pop("sha256")
    settings_by_kernel = doc.pop("kernels")
    if params.kernel in settings_by_kernel:
        settings = settings_by_kernel[params.kernel]
        if settings.get("covariance") is None:
            settings.pop("covariance", None)
        else:
            settings.pop("sigma")  # the covariance replaces it
        doc["kernels"] = {params.kernel: settings}
    doc.pop("mlflow")
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in config.flatten(doc).items()}


# --- opening the store ------------------------------------------------------------


def _quiet_mlflow() -> None:
    # MLflow and alembic log every schema step and a "View run" line at INFO; those
    # end up in `dvc queue logs`. MLFLOW_LOGGING_LEVEL, when set, still wins.
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _is_server(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("http", "https") or scheme.startswith("databricks")


@contextlib.contextmanager
def _one_quick_try(uri: str) -> Iterator[None]:
    """For a server, one HTTP try with a short timeout: MLflow's default retries take
    minutes to give up. MLflow's own auth and TLS settings still apply."""
    if not _is_server(uri):
        yield
        return
    knobs = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT),
    }
    saved = {name: os.environ.get(name) for name in knobs}
    os.environ.update(knobs)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _server_error(uri: str, exc: MlflowException) -> UserError:
    """A server that gave no answer, or an answer that is not MLflow's."""
    status = re.search(r"failed with error code (\d+)", exc.message)
    if status and status[1] in ("401", "403"):
        return UserError(
            f"MLflow server {uri} answers, but refuses access (HTTP {status[1]}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, "
            "or point MLFLOW_TRACKING_URI at another server"
        )
    if status or "not in a valid JSON format" in exc.message:
        answer = f"HTTP {status[1]}" if status else "not JSON"
        return UserError(
            f"MLflow server {uri} answers, but is not an MLflow tracking server ({answer} "
            "for MLflow's API); check the host, port and path in MLFLOW_TRACKING_URI "
            "(unset it to log to mlflow.db at the repo root)"
        )
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    reason = (
        errno.group(1).strip()
        if errno
        else f"no answer within {PROBE_TIMEOUT} s"
        if "timeout" in str(exc).lower()
        else type(exc.__cause__ or exc).__name__
    )
    return UserError(
        f"MLflow server {uri} is not reachable ({reason}); start it, or set "
        "MLFLOW_TRACKING_URI to a running server (unset it to log to mlflow.db "
        "at the repo root)"
    )


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock next to a SQLite database; no lock for any other store.

    The database's path is checked first: MLflow retries a file it can't open for
    about 100 s, with a warning each time, before it gives up.
    """
    if not uri.startswith("sqlite:"):
        return contextlib.nullcontext()
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    db = Path(database).absolute()
    lock = Path(f"{db}.lock")
    nearest = next(p for p in db.parents if p.exists())
    problem = None
    if db.is_dir():
        problem = f"{db} is a directory, not a SQLite file"
    elif not nearest.is_dir():
        problem = f"{nearest} is a file, not a folder"
    else:
        try:  # SQLite writes beside the database too (its journal), and so does the lock
            db.parent.mkdir(parents=True, exist_ok=True)
            lock.touch()
        except OSError as exc:
            problem = f"can't write in {db.parent} ({exc.strerror})"
    if problem:
        raise UserError(
            f"MLflow store {uri} can't be used: {problem}; fix the path, or point "
            "MLFLOW_TRACKING_URI at another store"
        )
    return FileLock(lock, timeout=LOCK_TIMEOUT)


def _store_error(uri: str, exc: Exception) -> UserError:
    message = str(getattr(exc, "message", None) or exc)
    schema = re.search(
        r"out-of-date database schema \(found version (\w+), but expected (\w+)", message
    )
    if schema:
        found, expected = schema.groups()
        return UserError(
            f"{uri} has MLflow schema {found}, but MLflow {mlflow.__version__} "
            f"needs {expected}; back it up, then run `mlflow db upgrade {uri}` "
            "(or, if a newer MLflow made it, use that version)"
        )
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return UserError(
        f"MLflow store {uri} can't be used: {first}; fix it, or point "
        "MLFLOW_TRACKING_URI at another store"
    )


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None if _is_server(uri) else paths.experiment_artifacts(name).as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND}
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another process made it first
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted; restore it with `mlflow "
            f"experiments restore --experiment-id {experiment.experiment_id}`, or "
            "set mlflow.experiment in params.yaml to a new name"
        )
    if KIND_TAG not in experiment.tags:  # made before the kind existed: open it as training
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)
    if EXPS_COPY in experiment.artifact_location:
        log.warning(
            "MLflow experiment %r keeps its artifacts in %s, inside a DVC experiment "
            "copy that is deleted after the run; set mlflow.experiment to a new name",
            name,
            experiment.artifact_location,
        )
    return experiment.experiment_id


def _open_store(experiment: str | None = None) -> tuple[MlflowClient, str | None]:
    """Point MLflow at paths.tracking_uri() and check it works; optionally get or create
    the experiment. Store problems become one-line UserErrors."""
    uri = paths.tracking_uri()
    _quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            with _one_quick_try(uri):
                client = MlflowClient(uri)  # opens the store: makes or checks the schema
                client.search_experiments(max_results=1)  # reaches the server
            experiment_id = _experiment_id(client, uri, experiment) if experiment else None
    except Timeout as exc:
        raise UserError(
            f"waited {LOCK_TIMEOUT:g} s for {exc.lock_file}: another process is "
            "creating the MLflow store; wait for it, or stop it"
        ) from exc
    except RestException as exc:  # a server answered, with an error
        raise _store_error(uri, exc) from exc
    except MlflowException as exc:
        raise (_server_error if _is_server(uri) else _store_error)(uri, exc) from exc
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _store_error(uri, exc) from exc
    return client, experiment_id


# --- run lifetime ---------------------------------------------------------------


def _lost_server(uri: str, exc: MlflowException) -> UserError:
    """A server that answered at the start and stopped answering during training, for
    longer than MLflow's client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES)."""
    first = str(exc.message).strip().splitlines()[0][:300] if str(exc.message).strip() else ""
    return UserError(
        f"lost the MLflow server {uri} during training ({first}); start it again, then "
        "rerun `dvc repro` (this training's run could not be finished there)"
    )


def _end_run(status: str) -> None:
    """End the active run with `status`, and mark a model it left unfinished (start_model
    before training) FAILED rather than pending. A failure is one warning line, so the
    error that ended the block stays the one the user sees."""
    try:
        with interrupts.uninterrupted():
            run = mlflow.active_run()
            if run is not None and status != "FINISHED":
                client = MlflowClient()
                for model in client.search_logged_models([run.info.experiment_id]):
                    pending = model.status == LoggedModelStatus.PENDING
                    if pending and model.source_run_id == run.info.run_id:
                        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            mlflow.end_run(status)
    except Exception as exc:
        log.warning(
            "could not mark the MLflow run %s: %s",
            status,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )


@contextlib.contextmanager
def training_run(params: config.Params) -> Iterator[str]:
    """Start the MLflow run of one training and yield its run id.

    Enter it before loading data, so an unusable store fails the stage at once.
    The run is ended FINISHED, KILLED (KeyboardInterrupt, SIGTERM, SystemExit) or
    FAILED (any other exception); SIGTERM is turned into KeyboardInterrupt inside.
    Tags go in with the run's creation, all params in one log_batch.
    """
    client, experiment_id = _open_store(params.mlflow.experiment)
    with interrupts.sigterm_as_interrupt():
        with interrupts.uninterrupted():
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=run_name(params), tags=run_tags(params)
            )
        run_id = run.info.run_id
        try:
            log.info(
                "MLflow run %s (%s) in experiment %r at %s",
                run.info.run_name,
                run_id,
                params.mlflow.experiment,
                mlflow.get_tracking_uri(),
            )
            with interrupts.uninterrupted():
                client.log_batch(
                    run_id, params=[Param(k, v) for k, v in run_params(params).items()]
                )
                client.log_dict(run_id, params.model_dump(mode="json"), "params.yaml")
            yield run_id
        except MlflowException as exc:
            _end_run("FAILED")
            if not _is_server(mlflow.get_tracking_uri()):
                raise
            raise _lost_server(mlflow.get_tracking_uri(), exc) from None
        except Exception:
            _end_run("FAILED")
            raise
        except BaseException:
            _end_run("KILLED")
            raise
        with interrupts.uninterrupted():
            mlflow.end_run("FINISHED")


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[str]:
    """Reopen a finished training run so a later stage adds artifacts to it.

    Fluent calls (mlflow.log_artifact, ...) inside the block go to this run, not
    to a new one. The run's status is left as training ended it, whatever happens.
    """
    client, _ = _open_store()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise _store_error(mlflow.get_tracking_uri(), exc) from exc
        raise UserError(
            f"MLflow run {run_id} is not in {mlflow.get_tracking_uri()}; the store "
            "changed since training: rerun it with `dvc repro -f train`"
        ) from exc
    if run.info.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow run {run_id} is deleted; restore it with `mlflow runs restore "
            f"--run-id {run_id}`, or rerun training with `dvc repro -f train`"
        )
    with interrupts.sigterm_as_interrupt():
        with interrupts.uninterrupted():
            mlflow.start_run(run_id=run_id)
        try:
            yield run_id
        finally:
            _end_run(run.info.status)


# --- what gets logged -------------------------------------------------------------


def _with_log10(values: dict[str, float]) -> dict[str, float]:
    values = {k: float(v) for k, v in values.items()}
    values.update(
        {f"log10_{k}": math.log10(v) for k, v in values.items() if k in LOG10_METRICS and v > 0}
    )
    return values


def log_epoch(
    run_id: str, epoch: int, metrics: dict[str, float], model_id: str | None = None
) -> None:
    """Log one epoch's metrics at step=epoch, in one write; step 0 is the initial kernel.

    LOG10_METRICS are logged again as log10_<name> (left out where the value is 0:
    log10 is -inf). With `model_id` (the last epoch) the metrics are also the MLflow
    model's.
    """
    client = MlflowClient()
    now = int(time.time() * 1000)
    values = _with_log10(metrics)
    with interrupts.uninterrupted():
        client.log_batch(
            run_id, metrics=[Metric(k, v, now, epoch, model_id) for k, v in values.items()]
        )


def log_snapshots(
    run_id: str,
    snapshots: Sequence[tuple[int, np.ndarray]],
    true_kernel: np.ndarray,
    value_range: tuple[float, float],
) -> None:
    """Log kernel snapshots at step = optimizer step: each one's picture under images/
    with key "kernel" (the run page shows an image grid with a step slider) and its
    error as kernel_rel_error_by_step and kernel_mse_by_step (and their log10_)."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    for step, kernel in snapshots:
        mse, rel = kernels.errors(kernel, true_kernel)
        values = _with_log10({"kernel_rel_error": rel, "kernel_mse": mse})
        image = figures.kernel_picture(kernel, value_range)
        with interrupts.uninterrupted():
            client.log_batch(
                run_id,
                metrics=[Metric(f"{k}_by_step", v, now, step) for k, v in values.items()],
            )
            client.log_image(run_id, image, key="kernel", step=step)


def set_converged(run_id: str, converged: bool) -> None:
    """Tag the run converged=true or false: whether training met its stopping rule or
    reached train.max_steps first (a filter in the runs table: tags.converged = 'false')."""
    with interrupts.uninterrupted():
        MlflowClient().set_tag(run_id, "converged", str(converged).lower())


def log_final(
    run_id: str,
    *,
    true_kernel: np.ndarray,
    learned_kernel: np.ndarray,
    value_range: tuple[float, float] | None = None,
) -> None:
    """Log the end of training: both kernels as pictures and .npy.

    Pictures share value_range (default: symmetric around the true kernel).
    """
    client = MlflowClient()
    value_range = value_range or figures.symmetric_range(true_kernel)
    for name, kernel in (("true_kernel", true_kernel), ("learned_kernel", learned_kernel)):
        client.log_image(
            run_id, figures.kernel_picture(kernel, value_range), artifact_file=f"{name}.png"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernel in (("true_kernel", true_kernel), ("learned_kernel", learned_kernel)):
            np.save(Path(tmp) / f"{name}.npy", np.asarray(kernel))
        client.log_artifacts(run_id, tmp)


def _dataset_source(params: config.Params):
    """Where the images came from, as MLflow names a dataset's source."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    data = params.data
    if data.source == "synthetic":
        return CodeDatasetSource({"generator": "src/dead_leaves.py", "seed": str(params.seed)})
    if data.source == "mit_scenes":
        return HTTPDatasetSource(paths.mit_url())
    if data.source == "samples":
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("scikit-image")
        except PackageNotFoundError:  # uninstalled since download: the run still logs
            release = "not installed"
        return CodeDatasetSource({"photos": "skimage/data", "scikit-image": release})
    return FileSystemDatasetSource.from_dict(
        {"uri": paths.source_path(data.source).absolute().as_uri()}
    )


def log_datasets(params: config.Params, index: pd.DataFrame, run_id: str) -> None:
    """The training and validation images as the run's dataset inputs: name, source,
    digest (of the image names and split) and, in the profile, the count."""
    client = MlflowClient()
    source = _dataset_source(params)
    named = params.data.source in ("synthetic", "mit_scenes", "samples")
    label = params.data.source if named else "photos"
    for split, context in (("train", "training"), ("val", "validation")):
        rows = index[index["split"] == split].reset_index(drop=True)
        if rows.empty:
            continue
        name = f"{label}-{split}-{params.data.size}px"
        dataset = mlflow.data.from_pandas(rows, source=source, name=name)
        entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag(DATASET_CONTEXT, context)])
        with interrupts.uninterrupted():
            try:
                client.log_inputs(run_id, datasets=[entry])
            except MlflowException as exc:
                # MLflow's SQL store looks the dataset up, then inserts it: of two runs that
                # log the same new dataset at once (two machines, one server on PostgreSQL),
                # the second breaks its unique key. The first has committed it by then, so
                # a second try finds it and links this run to it.
                if "dataset_pk" not in exc.message:
                    raise
                client.log_inputs(run_id, datasets=[entry])


# What the logged model needs to load and predict: src.layers imports only these.
MODEL_REQUIREMENTS = ("tensorflow-cpu", "keras", "numpy")


def start_model(run_id: str) -> str:
    """The id of the MLflow model this run's training will fill, made before training so
    the last epoch's metrics can be logged as the model's (log_epoch's model_id)."""
    with interrupts.uninterrupted():
        return mlflow.initialize_logged_model(
            name="model", source_run_id=run_id, model_type="keras"
        ).model_id


def log_model(model, example: np.ndarray, model_id: str, params: config.Params, error: float):
    """Log the learned filter as the MLflow Model `model_id` (the TensorFlow/Keras
    flavour) and return its ModelInfo: any H×W float32 images in, the filtered images out.

    src/ goes along as its code, so the model loads and predicts where only MLflow is
    installed beside our requirements; FFTConv2D is registered by src.layers. With
    mlflow.registered_model set, the model becomes a new version of that registered
    model, tagged with the kernel and its final kernel_rel_error `error`.
    """
    from importlib.metadata import version

    import mlflow.tensorflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def images(channels: int) -> Schema:
        return Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, channels))])

    signature = ModelSignature(inputs=images(example.shape[-1]), outputs=images(1))
    # MLflow runs the model on the input example, and Keras prints a progress bar for it
    with interrupts.uninterrupted(), contextlib.redirect_stdout(io.StringIO()):
        info = mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]
            + [f"mlflow=={mlflow.__version__}"],
            model_id=model_id,
        )
    name = params.mlflow.registered_model
    if name:
        tags = {"kernel": params.kernel, "kernel_rel_error": f"{error:.3e}"}
        with interrupts.uninterrupted():
            registered = mlflow.register_model(info.model_uri, name, tags=tags)
        log.info("registered as version %s of MLflow model %r", registered.version, name)
    return info
