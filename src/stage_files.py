"""The files one stage hands to the next. Each is written and read here, and nowhere else.

    download   data/raw/images/, data/raw/manifest.csv        name,split of every image
    grayscale  data/gray/images.npy (a stack), index.csv      name,split of each stack row
    filter     data/filtered/targets.npy (a stack), kernel.npy, filter.json
    train      model/ (kernel.npy, kernels.npy, model.keras, run.json),
               metrics/history.csv (one row per epoch), metrics/train.json
    visualize  figures/

Writers put their files into the temporary folder of an atomic_dir (src/atomic.py),
so a stage's outputs appear together or not at all. A reader that finds its file
missing or malformed says which stage to rerun.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from src import paths
from src.atomic import atomic_file, write_json
from src.errors import UserError
from src.stack import Stack

SPLITS = ("train", "val")
SPLIT_COLUMNS = ["name", "split"]
HISTORY_COLUMNS = ["epoch", "loss", "val_loss", "kernel_mse", "kernel_rel_error", "elapsed_s"]
OPTIONAL_HISTORY_COLUMNS = {"val_loss"}  # none without held-out images: its cells stay empty


# Who writes what: a missing file names the stage that makes it.
WRITERS = {
    paths.RAW: "download",
    paths.GRAY: "grayscale",
    paths.FILTERED: "filter",
    paths.MODEL: "train",
    paths.HISTORY: "train",
}
# What each stage reads, in the order it is checked: the first one missing is named.
INPUTS = {
    "filter": (paths.GRAY_IMAGES, paths.GRAY_INDEX),
    "train": (paths.GRAY_IMAGES, paths.GRAY_INDEX, paths.TARGETS, paths.KERNEL, paths.FILTER_INFO),
    "visualize": (
        paths.KERNEL_HISTORY,
        paths.LEARNED_KERNEL,
        paths.MODEL_FILE,
        paths.RUN_INFO,
        paths.HISTORY,
        paths.KERNEL,
        paths.FILTER_INFO,
        paths.TARGETS,
        paths.GRAY_IMAGES,
        paths.GRAY_INDEX,
    ),
}


def _missing(path: Path) -> UserError:
    writer = next(
        stage for folder, stage in WRITERS.items() if path == folder or folder in path.parents
    )
    return UserError(
        f"{path} is missing; run `dvc repro {writer}` first, or the whole pipeline with `dvc repro`"
    )


def require_inputs(stage: str) -> None:
    """Refuse to start `stage` before the stages it reads from have run."""
    for path in INPUTS[stage]:
        if not path.exists():
            raise _missing(path)


def _rerun(stage: str) -> str:
    return f"rerun `dvc repro -f {stage}`"


# --- name,split tables: the manifest (download) and the index (grayscale) -----------


def _write_splits(path: Path, names: list[str], splits: list[str]) -> None:
    pd.DataFrame({"name": names, "split": splits}, columns=SPLIT_COLUMNS).to_csv(path, index=False)


def _read_splits(path: Path, stage: str) -> pd.DataFrame:
    fix = f"rerun `dvc repro {stage}`"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{path} not found; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        raise UserError(f"{path} is not a name,split table; {fix}") from None
    if not set(SPLIT_COLUMNS) <= set(table.columns):
        raise UserError(f"{path} must have the columns name,split; {fix}")
    wrong = table.loc[~table["split"].isin(SPLITS), "split"]
    if len(wrong):
        raise UserError(f"{path}: split must be train or val, found {wrong.iloc[0]!r}; {fix}")
    if table.empty:
        raise UserError(f"{path} lists no images; {fix}")
    return table[SPLIT_COLUMNS]


def write_manifest(folder: Path, names: list[str], splits: list[str]) -> None:
    """manifest.csv in the download stage's output `folder`: one name,split row per image,
    names relative to images/."""
    _write_splits(Path(folder) / paths.MANIFEST.name, names, splits)


def read_manifest() -> pd.DataFrame:
    """The download stage's name,split table."""
    return _read_splits(paths.MANIFEST, "download")


def write_index(folder: Path, names: list[str], splits: list[str]) -> None:
    """index.csv in the grayscale stage's output `folder`: name,split of each stack row."""
    _write_splits(Path(folder) / paths.GRAY_INDEX.name, names, splits)


def read_index() -> pd.DataFrame:
    """The grayscale stage's name,split table, one row per row of images.npy."""
    return _read_splits(paths.GRAY_INDEX, "grayscale")


# --- image stacks ----------------------------------------------------------------


def open_gray_images() -> Stack:
    """The grayscale stage's (N, S, S) images."""
    return Stack(paths.GRAY_IMAGES, fix=_rerun("grayscale"))


def open_targets() -> Stack:
    """The filter stage's targets, one per grayscale image."""
    return Stack(paths.TARGETS, fix=_rerun("filter"))


def open_gray_images_with_index() -> tuple[Stack, pd.DataFrame]:
    """The grayscale images and their name,split index, checked to agree."""
    index = read_index()
    images = open_gray_images()
    if len(images) != len(index):
        images.close()
        raise UserError(
            f"{paths.GRAY_IMAGES} holds shape {images.shape} but "
            f"{paths.GRAY_INDEX} lists {len(index)} images; {_rerun('grayscale')}"
        )
    return images, index


# --- what the filter stage made ----------------------------------------------------


@dataclass(frozen=True)
class FilterInfo:
    """filter.json: how the targets were made."""

    kernel: str
    shape: tuple[int, int]  # the Conv2D kernel's (kh, kw)
    operation: str  # correlate | convolve
    padding: str  # valid | same
    noise_std: float
    images: int
    target_shape: tuple[int, int]


def write_filter_outputs(folder: Path, kernel: np.ndarray, info: FilterInfo) -> None:
    """kernel.npy, the exact kernel a Conv2D must learn, and filter.json, into `folder`."""
    folder = Path(folder)
    np.save(folder / paths.KERNEL.name, kernel)
    (folder / paths.FILTER_INFO.name).write_text(json.dumps(asdict(info), indent=2) + "\n")


def _load_kernels(path: Path, ndim: int, stage: str) -> np.ndarray:
    """A kernel .npy a stage wrote, as float64; a damaged one names the stage to rerun."""
    if not path.is_file():
        raise _missing(path)
    try:
        kernel = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        kernel = None
    if kernel is None or kernel.ndim != ndim or not np.all(np.isfinite(kernel)):
        raise UserError(f"{path} is not a finite {ndim}-D kernel array; {_rerun(stage)}")
    return kernel.astype(np.float64)


def read_true_kernel() -> np.ndarray:
    """The kernel the layer must learn, as float64: every metric compares against it."""
    return _load_kernels(paths.KERNEL, 2, "filter")


def read_filter_info() -> FilterInfo:
    if not paths.FILTER_INFO.is_file():
        raise _missing(paths.FILTER_INFO)
    try:
        doc = json.loads(paths.FILTER_INFO.read_text())
        return FilterInfo(
            **{**doc, "shape": tuple(doc["shape"]), "target_shape": tuple(doc["target_shape"])}
        )
    except (ValueError, TypeError, KeyError):
        raise UserError(
            f"{paths.FILTER_INFO} is not what the filter stage writes; {_rerun('filter')}"
        ) from None


# --- what the train stage made ------------------------------------------------------


def write_model(
    folder: Path, *, learned_kernel: np.ndarray, kernel_history: np.ndarray, model, run: dict
) -> None:
    """Into the train stage's `folder`: the final kernel, the kernel after every epoch
    (epochs, kh, kw), the Keras model in the filter's padding, and the MLflow run."""
    folder = Path(folder)
    np.save(folder / paths.LEARNED_KERNEL.name, learned_kernel)
    np.save(folder / paths.KERNEL_HISTORY.name, kernel_history)
    model.save(folder / paths.MODEL_FILE.name)
    write_json(folder / paths.RUN_INFO.name, run)


def read_run() -> dict:
    """run.json: the MLflow run that training logged to (run_id, tracking_uri, experiment)."""
    if not paths.RUN_INFO.is_file():
        raise _missing(paths.RUN_INFO)
    try:
        run = json.loads(paths.RUN_INFO.read_text())
        if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
            raise ValueError("no run_id")
    except ValueError:
        raise UserError(f"{paths.RUN_INFO} names no MLflow run; {_rerun('train')}") from None
    return run


def read_learned_kernels() -> tuple[np.ndarray, np.ndarray]:
    """(the final learned kernel, the kernel after every epoch), as float64."""
    return (
        _load_kernels(paths.LEARNED_KERNEL, 2, "train"),
        _load_kernels(paths.KERNEL_HISTORY, 3, "train"),
    )


def write_history(history: pd.DataFrame) -> None:
    """metrics/history.csv: one row per epoch, the columns of HISTORY_COLUMNS; an optional
    one that is absent is written as empty cells."""
    missing = set(HISTORY_COLUMNS) - OPTIONAL_HISTORY_COLUMNS - set(history.columns)
    if missing:
        raise ValueError(f"the history lacks {', '.join(sorted(missing))}")
    with atomic_file(paths.HISTORY) as handle:
        history.reindex(columns=HISTORY_COLUMNS).to_csv(handle, index=False, float_format="%.6g")


def read_history() -> pd.DataFrame:
    try:
        history = pd.read_csv(paths.HISTORY)
    except FileNotFoundError:
        raise _missing(paths.HISTORY) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        history = pd.DataFrame()
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if history.empty or missing:
        raise UserError(
            f"{paths.HISTORY} has no rows or lacks {', '.join(missing)}; "
            "rerun training with `dvc repro -f train`"
        )
    return history


def write_train_metrics(metrics: dict) -> None:
    write_json(paths.TRAIN_METRICS, metrics)


def write_grayscale_metrics(metrics: dict) -> None:
    write_json(paths.GRAYSCALE_METRICS, metrics)
