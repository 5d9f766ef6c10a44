"""Everything MLflow for the train and visualize stages.

    with tracking.training_run(params) as run_id:     # fails fast if the store is unusable
        tracking.log_datasets(params, index, run_id)
        model_id = tracking.start_model(run_id, params, names)   # named <kernel>-filter
        for epoch in ...:                              # a Keras callback in stages/train.py
            tracking.log_epoch(run_id, epoch, logs)    # the last epoch: with model_id
            tracking.log_snapshots(run_id, [(step, kernel), ...], true_kernel, value_range, names)
        tracking.log_outcome(run_id, summary, model_id)   # tags; once-per-run numbers
        tracking.log_final(run_id, true_kernel=..., learned_kernel=..., names=names)
        tracking.log_model(model, model_id, step=epochs, description=...)
    tracking.register_model(model_id, params, summary)   # after the run has ended

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
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
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
# Errors span 1e-1 to 1e-17, and MLflow's charts are linear by default: every error-like
# metric (these, their per-filter `<name>/<filter>`, `_by_step` and `lstsq_` forms) is also
# logged as log10_<key>, which the default charts separate.
LOG10_METRICS = (
    "kernel_rel_error",
    "kernel_mse",
    "loss",
    "val_loss",
    "crop_loss",
    "newton_step",
    "standard_error",
    "kernel_change",
)
# What a run ended as: tags (filters in the runs table: tags.converged = 'false'), not
# metrics, which would be single dots in the chart view.
OUTCOME_TAGS = ("converged", "stop_reason", "identifiable")
# The final metrics linked to the model carry the dataset they were measured on (the
# model page's "Datasets used" is read from them).
DATASET_OF = {"loss": "training", "crop_loss": "training", "val_loss": "validation"}
DATASET_OF |= {"explained_variance": "validation", "standard_error": "validation"}


# --- what a run records about itself --------------------------------------------


def run_name(params: config.Params) -> str:
    return f"{params.kernel_label}-{os.environ.get('DVC_EXP_NAME') or 'workspace'}"


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
        "kernel": params.kernel_label,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or head,
        "git_commit": head,
        "data.source": params.data.source,
    }


def run_params(params: config.Params) -> dict[str, str]:
    """The params that apply to this run, flattened to dotted keys, as MLflow's strings.

    train.* are the settings training used (TrainConfig.effective), with train.recipe.
    Settings the run never reads are left out (the Gaussian's on a smiley run, the MIT
    archive's pin on synthetic data, where MLflow logs to, K-FAC with Adam); the whole
    params.yaml is logged as an artifact beside them, so nothing is lost.
    """
    doc = params.model_dump(mode="json")
    # what training used: the recipe's settings, not the keys it overrides (the recipe
    # itself stays, as train.recipe); K-FAC preconditions SGD only
    doc["train"] = params.train.effective().model_dump(mode="json")
    if doc["train"].get("optimizer") == "adam":
        doc["train"].pop("precondition", None)
    data = doc["data"]
    if params.data.source != "synthetic":
        data.pop("count")
    if params.data.source != "mit_scenes":
        data.pop("categories")
    if params.data.source != "mit_scenes" or not params.data.sha256:
        data.pop("sha256")
    settings_by_kernel = doc.pop("kernels")
    used = {}
    for name in params.kernel_names:  # the settings of the kernels the run uses
        if name in settings_by_kernel:
            settings = settings_by_kernel[name]
            if "covariance" in settings and settings.get("covariance") is None:
                settings.pop("covariance", None)
            elif "covariance" in settings:
                settings.pop("sigma", None)  # the covariance replaces it
            used[name] = settings
    if used:
        doc["kernels"] = used
    if not isinstance(doc.get("kernel"), str):
        doc["kernel"] = params.kernel_label
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
def _http_settings(uri: str, knobs: dict[str, str]) -> Iterator[None]:
    """MLflow's HTTP client settings (MLFLOW_HTTP_REQUEST_*) for the requests inside, for
    a server; MLflow's own auth and TLS settings still apply."""
    if not _is_server(uri):
        yield
        return
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


def _one_quick_try(uri: str) -> contextlib.AbstractContextManager:
    """For a server, one HTTP try with a short timeout: MLflow's default retries take
    minutes to give up."""
    knobs = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT),
    }
    return _http_settings(uri, knobs)


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


def _first_line(text: str, limit: int = 200) -> str:
    """The first line of a message, shortened at a word, never inside one."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " …"


def _no_answer(exc: Exception) -> str:
    """Why a server gave no answer, in a few words: the OS's reason, or a timeout."""
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if errno:
        return errno.group(1).strip()
    if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
        return "no answer in time"
    return _first_line(str(getattr(exc, "message", exc)), 120) or type(exc).__name__


def _lost_server(uri: str, exc: MlflowException) -> UserError:
    """A server that failed a request during training. One that answered with an error
    (HTTP 4xx) is up: that is its error, not a lost server. One that stopped answering,
    for longer than MLflow's client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES), is lost."""
    if isinstance(exc, RestException):
        return UserError(
            f"MLflow server {uri} refused a request during training ({exc.error_code}: "
            f"{_first_line(exc.message)}); fix that, then rerun `dvc repro`"
        )
    return UserError(
        f"lost the MLflow server {uri} during training ({_no_answer(exc)}); start it again, "
        "then rerun `dvc repro` (this training's run could not be finished there)"
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


def _error_like(key: str) -> bool:
    base = key.split("/")[0].removeprefix("lstsq_").removesuffix("_by_step")
    return base in LOG10_METRICS


def _key(key: str) -> str:
    """A metric or image key as MLflow allows it (a file: kernel's name may hold more)."""
    return re.sub(r"[^\w.\- /]", "_", key)


def _with_log10(values: dict[str, float]) -> dict[str, float]:
    """The numbers among `values`, and log10_<key> of each error-like one (left out where
    the value is 0 or less: log10 is -inf there). Outcome tags and text are not metrics."""
    numbers = {
        _key(k): float(v)
        for k, v in values.items()
        if k not in OUTCOME_TAGS
        and isinstance(v, (int, float, np.number))
        and not isinstance(v, bool)
    }
    numbers.update(
        {f"log10_{k}": math.log10(v) for k, v in numbers.items() if _error_like(k) and v > 0}
    )
    return numbers


def _datasets(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str]]:
    """The run's dataset inputs by context (training, validation): (name, digest)."""
    found = {}
    for entry in client.get_run(run_id).inputs.dataset_inputs:
        context = next((t.value for t in entry.tags if t.key == DATASET_CONTEXT), None)
        found[context] = (entry.dataset.name, entry.dataset.digest)
    return found


def _metrics(
    client: MlflowClient, run_id: str, values: dict[str, float], step: int, model_id: str | None
) -> list[Metric]:
    """Metrics at `step`; with `model_id` also the model's, each with its dataset."""
    now = int(time.time() * 1000)
    datasets = _datasets(client, run_id) if model_id else {}
    metrics = []
    for key, value in values.items():
        name, digest = datasets.get(DATASET_OF.get(key.removeprefix("log10_")), (None, None))
        metrics.append(Metric(key, value, now, step, model_id, name, digest))
    return metrics


def log_epoch(
    run_id: str, epoch: int, metrics: dict[str, float], model_id: str | None = None
) -> None:
    """Log one epoch's metrics at step=epoch, in one write; step 0 is the initial kernel
    (log there what exists before training: the kernel errors, steps 0, elapsed_s 0, the
    learning rate, so that no chart is a single dot after one epoch).

    Error-like metrics are logged again as log10_<key> (_with_log10); the outcome keys
    (converged, ...) are left out: log_outcome tags them. With `model_id` (the last
    epoch) the metrics are also the MLflow model's: only the final ones are.
    """
    client = MlflowClient()
    with interrupts.uninterrupted():
        batch = _metrics(client, run_id, _with_log10(metrics), epoch, model_id)
        client.log_batch(run_id, metrics=batch)


def _outcome_tags(summary: dict) -> dict[str, str]:
    """converged, stop_reason, identifiable as tag text: true/false for the flags."""
    return {
        k: str(bool(v)).lower() if isinstance(v, (bool, np.bool_)) else str(v)
        for k, v in summary.items()
        if k in OUTCOME_TAGS
    }


def artifact_uri(run_id: str) -> str:
    """Where the run keeps its artifacts (a local folder for a file or SQLite store)."""
    return MlflowClient().get_run(run_id).info.artifact_uri


def log_outcome(run_id: str, summary: dict, model_id: str | None = None) -> None:
    """What the run ended as (metrics/train.json's dict): converged, stop_reason and
    identifiable as tags; the once-per-run numbers (epochs, train_seconds, lstsq_*, ...:
    those not already logged every epoch) as metrics at step 0, with their log10_ twins.

    MLflow's chart view draws a metric whose every point is at step 0 as a bar per run,
    and one with a point at step 1 or later as a line (one dot, for a number logged once
    at the end); the runs table shows both as sortable numbers. With `model_id` they are
    also the model's.
    """
    client = MlflowClient()
    tags = _outcome_tags(summary)
    with interrupts.uninterrupted():
        logged = set(client.get_run(run_id).data.metrics)
        once = {k: v for k, v in summary.items() if k not in logged}
        batch = _metrics(client, run_id, _with_log10(once), 0, model_id)
        client.log_batch(run_id, metrics=batch, tags=[RunTag(k, v) for k, v in tags.items()])


def set_converged(run_id: str, converged: bool) -> None:
    """Tag the run converged=true or false (log_outcome does this with the rest)."""
    with interrupts.uninterrupted():
        MlflowClient().set_tag(run_id, "converged", str(converged).lower())


# --- kernels as pictures ------------------------------------------------------------


def as_bank(kernel: np.ndarray) -> np.ndarray:
    """Any kernel as (kh, kw, C, F): a 2-D one is one channel and one filter, a 3-D one
    (kh, kw, C) one filter."""
    k = np.asarray(kernel, dtype=np.float64)
    return k.reshape(k.shape + (1,) * (4 - k.ndim)) if k.ndim < 4 else k


def _filter_image(bank: np.ndarray, f: int, names: Sequence[str], value_range):
    """Filter f of a (kh, kw, C, F) bank as figures.kernel_image draws it (channels side by
    side on one colour range, with a colour bar), on its range of figures.kernel_ranges
    (one (low, high) per filter), on one (low, high) for every filter, or its own with
    None."""
    if value_range is None or np.shape(value_range) == (2,):
        ranges = value_range
    else:
        ranges = list(value_range)[f : f + 1]
    return figures.kernel_image(bank[..., f : f + 1], [names[f]], ranges)


def _per_filter(key: str, names: Sequence[str]) -> list[str]:
    """The key of each filter: `key` for one filter, `key/<name>` in a bank (MLflow's
    chart view groups keys by what comes before the '/')."""
    return [key] if len(names) == 1 else [_key(f"{key}/{name}") for name in names]


def _names(bank: np.ndarray, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return ["kernel"] if bank.shape[3] == 1 else [f"filter{f}" for f in range(bank.shape[3])]
    if len(names) != bank.shape[3]:
        raise ValueError(f"{len(names)} names for {bank.shape[3]} filters")
    return list(names)


def kernel_errors(
    learned: np.ndarray, true: np.ndarray, names: Sequence[str], suffix: str = ""
) -> dict[str, float]:
    """kernel_mse and kernel_rel_error over the whole bank, and for a bank of more than
    one filter kernel_rel_error/<name> of each (`suffix` goes after the base name)."""
    learned, true = as_bank(learned), as_bank(true)
    mse, rel = kernels.errors(learned, true)
    values = {f"kernel_mse{suffix}": mse, f"kernel_rel_error{suffix}": rel}
    if len(names) > 1:
        for f, key in enumerate(_per_filter(f"kernel_rel_error{suffix}", names)):
            values[key] = kernels.errors(learned[..., f], true[..., f])[1]
    return values


def log_snapshots(
    run_id: str,
    snapshots: Sequence[tuple[int, np.ndarray]],
    true_kernel: np.ndarray | None,
    value_range,
    names: Sequence[str] | None = None,
) -> None:
    """Log kernel snapshots at step = optimizer step: each filter's picture under images/,
    key "kernel" (one filter) or "kernel/<name>" (a bank), which the run page shows as an
    image grid with a step slider; and, with a true kernel, the errors as
    kernel_rel_error_by_step and kernel_mse_by_step (per filter, and their log10_)."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    for step, kernel in snapshots:
        bank = as_bank(kernel)
        filters = _names(bank, names)
        values = (
            {} if true_kernel is None else kernel_errors(bank, true_kernel, filters, "_by_step")
        )
        with interrupts.uninterrupted():
            if values:
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, v, now, step) for k, v in _with_log10(values).items()],
                )
            for f, key in enumerate(_per_filter("kernel", filters)):
                client.log_image(
                    run_id, _filter_image(bank, f, filters, value_range), key=key, step=step
                )


def log_final(
    run_id: str,
    *,
    true_kernel: np.ndarray | None,
    learned_kernel: np.ndarray,
    value_range=None,
    names: Sequence[str] | None = None,
) -> None:
    """Log the end of training: the kernels as pictures (true_kernel.png and
    learned_kernel.png, or for a bank true_kernel/<name>.png ...) and as .npy.

    Pictures share value_range (default: symmetric around the true kernel, else the
    learned one). With no true kernel (a non-linear filter), only the learned one.
    """
    client = MlflowClient()
    learned = as_bank(learned_kernel)
    filters = _names(learned, names)
    kernels_by_name = {"learned_kernel": (learned_kernel, learned)}
    if true_kernel is not None:
        kernels_by_name = {"true_kernel": (true_kernel, as_bank(true_kernel)), **kernels_by_name}
    value_range = value_range or figures.kernel_ranges(
        as_bank(true_kernel) if true_kernel is not None else learned
    )
    with interrupts.uninterrupted():
        for name, (_, bank) in kernels_by_name.items():
            for f, filter_name in enumerate(filters):
                path = f"{name}.png" if len(filters) == 1 else f"{name}/{filter_name}.png"
                client.log_image(
                    run_id, _filter_image(bank, f, filters, value_range), artifact_file=path
                )
        with tempfile.TemporaryDirectory() as tmp:
            for name, (given, _) in kernels_by_name.items():
                np.save(Path(tmp) / f"{name}.npy", np.asarray(given))
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


# --- the model and the registry ----------------------------------------------------

# What the logged model needs to load and predict: src.layers imports only these.
MODEL_REQUIREMENTS = ("tensorflow-cpu", "keras", "numpy")
MODEL_LABEL_MAX = 60  # a bank's model name lists its first filters, then "+N more"
NOTE_TAG = "mlflow.note.content"  # the description MLflow's model pages show
# A server that goes away while a model is registered: a few quick retries, not MLflow's
# ~4 minutes (the run has ended by then, nothing else waits for it)
REGISTER_RETRIES, REGISTER_BACKOFF, REGISTER_TIMEOUT = 3, 1, 10


def model_name(names: Sequence[str]) -> str:
    """`<kernel>-filter`; a bank's names joined by '+' (shortened: `a+b+c+5 more-filter`).
    Characters MLflow refuses in a model's name (/ : . % " ') become '-'."""
    label, shown = "+".join(names), list(names)
    while len(label) > MODEL_LABEL_MAX and len(shown) > 1:
        shown.pop()
        label = "+".join(shown) + f"+{len(names) - len(shown)} more"
    return re.sub(r"[/:.%\"']", "-", label[: MODEL_LABEL_MAX + 20]) + "-filter"


def start_model(
    run_id: str, params: config.Params | None = None, names: Sequence[str] | None = None
) -> str:
    """The id of the MLflow model this run's training will fill, made before training so
    the last epoch's metrics can be logged as the model's (log_epoch's model_id). It is
    named model_name(names) (default: the kernel's name) and carries the run's params."""
    names = names or [params.kernel_label if params else "kernel"]
    with interrupts.uninterrupted():
        return mlflow.initialize_logged_model(
            name=model_name(names),
            source_run_id=run_id,
            model_type="keras",
            params=run_params(params) if params else None,
        ).model_id


def model_description(model, names: Sequence[str], summary: dict) -> str:
    """What the model is, how well it learned, and what it takes, for its page."""
    from src import serving

    served = serving.LearnedFilter(model)
    kh, kw = served.kernel_size
    outcome = (
        f"converged ({summary.get('stop_reason', 'stopping rule')})"
        if summary.get("converged")
        else f"NOT converged ({summary.get('stop_reason', 'max_steps')})"
    )
    error = summary.get("kernel_rel_error")
    learned = f"kernel_rel_error {error:.2e}, " if error is not None else ""
    return (
        f"The {', '.join(names)} filter learned by one conv layer: a {kh}×{kw} kernel, "
        f"{served.channels} channel(s) in, {served.filters} filter(s) out, "
        f"{served.padding} padding. {learned}{summary.get('steps', '?')} steps, {outcome}. "
        f"It takes {served.takes()}."
    )


def log_model(model, model_id: str, *, step: int, description: str = ""):
    """Save the Keras `model` as the MLflow Model `model_id` and return its ModelInfo.

    TensorFlow/Keras flavour, served by src.serving (silent, one-line input errors),
    with src/ as its code, so it loads where only MLflow and our
    requirements are installed (FFTConv2D is registered by src.layers). The signature is
    given, not inferred from an input example that MLflow would run the model on: float32
    (-1, -1, -1, C) in, (-1, -1, -1, F) out. `step` is the last epoch, where the model is
    logged. MLflow's log_model would link every metric logged at that step to the model a
    second time, without its dataset; log_epoch and log_outcome link the final ones.
    """
    from importlib.metadata import version

    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from src import serving

    def images(channels: int) -> Schema:
        return Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, int(channels)))])

    client = MlflowClient()
    served = serving.LearnedFilter(model)  # FFTConv2D's output_shape has no channel count
    signature = ModelSignature(inputs=images(served.channels), outputs=images(served.filters))
    requirements = [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]
    with interrupts.uninterrupted():
        logged = client.get_logged_model(model_id)
        mlflow_model = Model(
            artifact_path=logged.artifact_location,
            model_uuid=model_id,
            run_id=logged.source_run_id,
            model_id=model_id,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            serving.save_model(
                model,
                path,
                mlflow_model,
                signature,
                requirements + [f"mlflow=={mlflow.__version__}"],
            )
            client.log_model_artifacts(model_id, str(path))
        client.log_outputs(logged.source_run_id, [LoggedModelOutput(model_id, step)])
        if description:
            client.set_logged_model_tags(model_id, {NOTE_TAG: description})
        logged = client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    return mlflow_model.get_model_info(logged)


def _register_error(uri: str, name: str, model_id: str, exc: MlflowException) -> UserError:
    again = (
        f"register it by hand: mlflow.register_model('models:/{model_id}', '{name}'), "
        "or rerun `dvc repro -f train`"
    )
    if isinstance(exc, RestException) or not _is_server(uri):
        return UserError(
            f"MLflow refused to register the model as a version of {name!r} "
            f"({exc.error_code}: {_first_line(exc.message)}); the run is complete; {again}"
        )
    return UserError(
        f"lost the MLflow server {uri} while registering the model as a version of "
        f"{name!r} ({_no_answer(exc)}); the run is complete; once the server is back, {again}"
    )


def register_model(model_id: str, params: config.Params, summary: dict) -> int | None:
    """With mlflow.registered_model set, make the model a new version of that registered
    model, tagged with its kernel, error and outcome, and return the version.

    Call it after training_run has ended the run FINISHED: a server lost here cannot
    leave the run RUNNING, and no version points at a run that failed. A run that did
    not converge registers nothing (one warning line) unless
    mlflow.register_unconverged is true. A server that stops answering fails this within
    about half a minute, in one line.
    """
    name = params.mlflow.registered_model
    if not name:
        return None
    converged = bool(summary.get("converged"))
    if not converged and not params.mlflow.register_unconverged:
        log.warning(
            "not registered as a version of %r: the run did not converge (%s); set "
            "mlflow.register_unconverged true to register unconverged runs too",
            name,
            summary.get("stop_reason", "max_steps"),
        )
        return None
    tags = _outcome_tags(summary)
    tags["kernel"] = params.kernel_label
    if summary.get("kernel_rel_error") is not None:
        tags["kernel_rel_error"] = f"{summary['kernel_rel_error']:.3e}"
    uri = mlflow.get_tracking_uri()
    knobs = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(REGISTER_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(REGISTER_BACKOFF),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REGISTER_TIMEOUT),
    }
    try:
        with interrupts.uninterrupted(), _http_settings(uri, knobs):
            registered = mlflow.register_model(
                f"models:/{model_id}", name, await_registration_for=0, tags=tags
            )
    except MlflowException as exc:
        raise _register_error(uri, name, model_id, exc) from None
    log.info("registered as version %s of MLflow model %r", registered.version, name)
    return int(registered.version)
