"""Where everything lives. Paths and the MLflow location are decided here only.

Stage paths are relative to the working directory, which DVC sets to the repo
root, or to the experiment's own copy of it for queued and --temp runs. The
MLflow store is different: it must outlive those copies, so it is anchored at
the *main* repo root.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

RAW = Path("data/raw")  # download: images/ + manifest.csv
RAW_IMAGES = RAW / "images"
MANIFEST = RAW / "manifest.csv"  # name,split — the seeded train/val split
GRAY = Path("data/gray")  # grayscale: images.npy (N, S, S) float32 + index.csv
GRAY_IMAGES = GRAY / "images.npy"
GRAY_INDEX = GRAY / "index.csv"
FILTERED = Path("data/filtered")  # filter: targets.npy + kernel.npy
TARGETS = FILTERED / "targets.npy"
KERNEL = FILTERED / "kernel.npy"  # the exact kernel a Conv2D must learn (flipped for convolve)
FILTER_INFO = FILTERED / "filter.json"
MODEL = Path("model")  # train:
LEARNED_KERNEL = MODEL / "kernel.npy"  #   the final learned kernel
BIAS = MODEL / "bias.json"  #   the final model's fitted bias
KERNEL_HISTORY = MODEL / "kernels.npy"  #   (n, kh, kw): snapshots at log-spaced steps
LSTSQ_KERNEL = MODEL / "lstsq_kernel.npy"  #   the closed-form least-squares kernel
MODEL_FILE = MODEL / "model.keras"  #   the Keras model, in the filter's padding
RUN_INFO = MODEL / "run.json"  #   the MLflow run id, for visualize to add to
METRICS = Path("metrics")  # DVC metrics and plots, kept in git
TRAIN_METRICS = METRICS / "train.json"
HISTORY = METRICS / "history.csv"  # one row per epoch
STEPS = METRICS / "steps.csv"  # one row per kernel snapshot
GRAYSCALE_METRICS = METRICS / "grayscale.json"
FIGURES = Path("figures")  # visualize
DOWNLOADS = Path(".cache/downloads")  # partial and finished archives, outside DVC outputs


def repo_root(cwd: Path | None = None) -> Path:
    """The main repository root, also from inside a queued or --temp experiment copy.

    DVC sets DVC_ROOT to the main root in every run type. By hand, an experiment
    copy lives under <root>/.dvc/tmp/exps/, and git alone would name the copy.
    """
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    text = str(cwd)
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps"
    if marker in text:
        return Path(text.split(marker)[0])
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return Path(out).parent
    except (OSError, subprocess.CalledProcessError):
        return cwd


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite store at the main repo root.

    A relative SQLite path (`sqlite:///mlflow.db`, MLflow's documented form) is
    taken from the main root too: from the cwd, a queued or --temp run would log
    into its experiment copy, which DVC deletes.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"
    relative = re.fullmatch(r"(sqlite(?:\+\w+)?:///)(?![/:]|file:)(.+)", uri)
    return f"{relative[1]}{repo_root() / relative[2]}" if relative else uri


def artifact_root() -> Path:
    """Where new MLflow experiments keep artifacts: under the main root, never in a copy."""
    return repo_root() / "mlartifacts"


PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def experiment_artifacts(experiment: str) -> Path:
    """The artifact folder of a new local MLflow experiment: one folder directly in
    artifact_root(), whatever the name (`../x`, `/x`, `a/b` are names, not paths).

    A plain name is its own folder, as it always was. Any other name becomes its
    safe characters plus a hash of the whole name, so `a/b` and `a b` stay apart.
    """
    if PLAIN_NAME.fullmatch(experiment):
        return artifact_root() / experiment
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", experiment).strip("-")[:60]
    digest = hashlib.sha256(experiment.encode()).hexdigest()[:12]
    return artifact_root() / f"{slug}-{digest}".lstrip("-")


# The MIT scenes archive; LLF_MIT_URL overrides it (a mirror, or a local server in tests).
MIT_URL = (
    "https://people.csail.mit.edu/torralba/code/spatialenvelope/"
    "spatial_envelope_256x256_static_8outdoorcategories.zip"
)
MIT_URL_ENV = "LLF_MIT_URL"


def mit_url() -> str:
    return os.environ.get(MIT_URL_ENV) or MIT_URL


def source_path(source: str) -> Path:
    """data.source as a path: from the working directory, or else from the main repo
    root, which a queued experiment (run in a temporary copy) still sees."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return path
    from_root = repo_root() / path
    return from_root if from_root.exists() else path
