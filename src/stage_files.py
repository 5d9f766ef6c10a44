"""The files one stage hands to the next. Each is written and read here, and nowhere else.

    download   data/raw/images/, data/raw/manifest.csv        name,split of every image
    grayscale  data/gray/images.npy (a stack), index.csv      name,split of each stack row
    filter     data/filtered/targets.npy (a stack), kernel.npy (linear filters only),
               filter.json, inputs.npy (a stack, with filter.rescale > 1 only)
    train      model/ (kernel.npy, bias.json, kernels.npy, model.keras, run.json),
               metrics/history.csv (one row per epoch), metrics/steps.csv (one row
               per kernel snapshot), metrics/train.json
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
HISTORY_COLUMNS = [
    "epoch",
    "steps",
    "crop_loss",
    "loss",
    "val_loss",
    "explained_variance",
    "kernel_mse",
    "kernel_rel_error",
    "newton_step",
    "standard_error",
    "kernel_change",
    "elapsed_s",
]
# val_loss: none without held-out images; the kernel errors: none for a filter with no true
# kernel (median, …). Absent ones are left out of the file; a bank's kernel_rel_error/<name>
# columns follow the others.
OPTIONAL_HISTORY_COLUMNS = {"val_loss", "kernel_mse", "kernel_rel_error", "standard_error"}
# step: the optimizer step of a kernel snapshot; epoch: the 1-based epoch it falls in, 0 for
# step 0; the kernel errors (and a bank's kernel_rel_error/<name>) when a true kernel exists
STEPS_COLUMNS = ["step", "epoch"]
STEPS_ERROR_COLUMNS = ["kernel_mse", "kernel_rel_error"]


# Who writes what: a missing file names the stage that makes it.
WRITERS = {
    paths.RAW: "download",
    paths.GRAY: "grayscale",
    paths.FILTERED: "filter",
    paths.MODEL: "train",
    paths.HISTORY: "train",
    paths.STEPS: "train",
}
# What each stage reads, in the order it is checked: the first one missing is named.
INPUTS = {
    "filter": (paths.GRAY_IMAGES, paths.GRAY_INDEX),
    # not kernel.npy: a non-linear filter has none (read_true_kernel says when it is missing)
    "train": (paths.GRAY_IMAGES, paths.GRAY_INDEX, paths.TARGETS, paths.FILTER_INFO),
    "visualize": (
        paths.KERNEL_HISTORY,
        paths.LEARNED_KERNEL,
        paths.BIAS,
        paths.RUN_INFO,
        paths.HISTORY,
        paths.STEPS,
        paths.FILTER_INFO,  # not paths.KERNEL: a non-linear filter has no true kernel
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
    """The grayscale stage's (N, S, S, C) images (S = data.size × filter.rescale)."""
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

    kernel: str  # the names of params.yaml's `kernel`, joined by ","
    names: tuple[str, ...]  # one per filter (a file: kernel by its file stem)
    shape: tuple[int, int]  # the Conv2D kernel's (kh, kw)
    channels: int  # C, the input channels
    filters: int  # F, the target channels
    activation: str  # linear | relu | sigmoid | tanh, after the conv
    linear: bool  # a true kernel exists (kernel.npy); false for median, max, min, …
    rescale: int  # the targets were made at rescale× resolution, then reduced
    operation: str  # correlate | convolve
    padding: str  # valid | same
    noise_std: float
    images: int
    target_shape: tuple[int, int]


def write_filter_outputs(folder: Path, kernel: np.ndarray | None, info: FilterInfo) -> None:
    """Into `folder`: kernel.npy, the exact (kh, kw, C, F) kernel a Conv2D must learn (none
    for a non-linear filter), and filter.json."""
    folder = Path(folder)
    if (kernel is not None) != info.linear:
        raise ValueError("a linear filter has a kernel, a non-linear one none")
    if kernel is not None:
        np.save(folder / paths.KERNEL.name, kernel)
    (folder / paths.FILTER_INFO.name).write_text(json.dumps(asdict(info), indent=2) + "\n")


def _load_kernels(path: Path, ndim: int | tuple[int, ...], stage: str) -> np.ndarray:
    """A kernel .npy a stage wrote, as float64; a damaged one names the stage to rerun."""
    if not path.is_file():
        raise _missing(path)
    try:
        kernel = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        kernel = None
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if kernel is None or kernel.ndim not in allowed or not np.all(np.isfinite(kernel)):
        raise UserError(f"{path} is not a finite {allowed[-1]}-D kernel array; {_rerun(stage)}")
    return kernel.astype(np.float64)


def _as_bank(kernel: np.ndarray) -> np.ndarray:
    """A kernel file from before colour and banks, (kh, kw), as (kh, kw, 1, 1)."""
    return kernel[:, :, None, None] if kernel.ndim == 2 else kernel


def read_true_kernel() -> np.ndarray | None:
    """The (kh, kw, C, F) kernel the layer must learn, as float64: every kernel metric
    compares against it. None for a non-linear filter (filter.json's linear is false),
    which has no true kernel."""
    info = read_filter_info()
    if not info.linear:
        return None
    kernel = _load_kernels(paths.KERNEL, 4, "filter")
    if kernel.shape != (*info.shape, info.channels, info.filters):
        raise UserError(
            f"{paths.KERNEL} has shape {kernel.shape}, but {paths.FILTER_INFO} says "
            f"{(*info.shape, info.channels, info.filters)}; {_rerun('filter')}"
        )
    return kernel


def read_filter_info() -> FilterInfo:
    """filter.json, as FilterInfo: `names` are the bank's filter names, in target order."""
    if not paths.FILTER_INFO.is_file():
        raise _missing(paths.FILTER_INFO)
    try:
        doc = json.loads(paths.FILTER_INFO.read_text())
        return FilterInfo(
            **{
                **doc,
                "names": tuple(doc["names"]),
                "shape": tuple(doc["shape"]),
                "target_shape": tuple(doc["target_shape"]),
            }
        )
    except (ValueError, TypeError, KeyError):
        raise UserError(
            f"{paths.FILTER_INFO} is not what the filter stage writes; {_rerun('filter')}"
        ) from None


def open_inputs() -> Stack:
    """The (N, S, S, C) images the layer sees, S = data.size: data/gray's images, or with
    filter.rescale > 1 (data/gray then holds the fine ones) the filter stage's reduced
    copy, data/filtered/inputs.npy. Row i goes with target i."""
    if read_filter_info().rescale > 1:
        return Stack(paths.INPUTS, fix=_rerun("filter"))
    return open_gray_images()


# --- what the train stage made ------------------------------------------------------


def write_model(
    folder: Path,
    *,
    learned_kernel: np.ndarray,
    bias,
    kernel_history: np.ndarray,
    model,
    run: dict,
    lstsq: dict | None = None,
) -> None:
    """Into the train stage's `folder`: the final kernel (kh, kw, C, F) and its biases, the
    kernel snapshots (n, kh, kw, C, F) of metrics/steps.csv's rows, the Keras model in the
    filter's padding, the MLflow run, and the closed-form filter (`lstsq`: its kernel,
    bias and measures) when there is one."""
    folder = Path(folder)
    np.save(folder / paths.LEARNED_KERNEL.name, learned_kernel)
    write_json(folder / paths.BIAS.name, {"bias": [float(b) for b in np.ravel(bias)]})
    np.save(folder / paths.KERNEL_HISTORY.name, kernel_history)
    model.save(folder / paths.MODEL_FILE.name)
    write_json(folder / paths.RUN_INFO.name, run)
    if lstsq is not None:
        np.save(folder / paths.LSTSQ_KERNEL.name, lstsq["kernel"])
        write_json(
            folder / paths.LSTSQ_INFO.name,
            {key: value for key, value in lstsq.items() if key != "kernel"},
        )


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


def read_learned_layer() -> tuple[np.ndarray, list[float]]:
    """The final model's (kernel, biases): its (kh, kw, C, F) kernel as float64, in Conv2D
    orientation like the true kernel, and one bias per filter, so that the layer's output
    can be reproduced without Keras."""
    kernel = _as_bank(_load_kernels(paths.LEARNED_KERNEL, (2, 4), "train"))
    if not paths.BIAS.is_file():
        raise _missing(paths.BIAS)
    try:
        bias = np.atleast_1d(json.loads(paths.BIAS.read_text())["bias"])
        if bias.dtype.kind not in "iuf" or bias.shape != kernel.shape[3:]:
            raise ValueError("not one number per filter")
        if not np.all(np.isfinite(bias)):
            raise ValueError("not finite")
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{paths.BIAS} holds no finite bias; {_rerun('train')}") from None
    return kernel, [float(b) for b in bias]


def read_lstsq_kernel() -> np.ndarray | None:
    """The closed-form least-squares (kh, kw, C, F) kernel, or None if training wrote none."""
    if not paths.LSTSQ_KERNEL.is_file():
        return None
    return _load_kernels(paths.LSTSQ_KERNEL, 4, "train")


def read_kernel_snapshots() -> np.ndarray:
    """The (n, kh, kw, C, F) kernel snapshots, one per row of metrics/steps.csv, as float64."""
    snapshots = _load_kernels(paths.KERNEL_HISTORY, (3, 5), "train")
    return snapshots[..., None, None] if snapshots.ndim == 3 else snapshots


def _table_columns(table: pd.DataFrame, base: list[str]) -> list[str]:
    """The base columns the table has, in order, then a bank's kernel_rel_error/<name>."""
    return [c for c in base if c in table.columns] + [
        c for c in table.columns if c.startswith("kernel_rel_error/")
    ]


def write_history(history: pd.DataFrame) -> None:
    """metrics/history.csv: one row per epoch, the columns of HISTORY_COLUMNS (an optional
    one that is absent left out), then a bank's kernel_rel_error/<name>."""
    missing = set(HISTORY_COLUMNS) - OPTIONAL_HISTORY_COLUMNS - set(history.columns)
    if missing:
        raise ValueError(f"the history lacks {', '.join(sorted(missing))}")
    with atomic_file(paths.HISTORY) as handle:
        history.reindex(columns=_table_columns(history, HISTORY_COLUMNS)).to_csv(
            handle, index=False, float_format="%.6g"
        )


def _read_metrics_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """A table the train stage wrote; missing, empty or lacking a column names train."""
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise _missing(path) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        table = pd.DataFrame()
    missing = [c for c in columns if c not in table.columns]
    if table.empty or missing:
        raise UserError(
            f"{path} has no rows or lacks {', '.join(missing)}; "
            "rerun training with `dvc repro -f train`"
        )
    return table


def read_history() -> pd.DataFrame:
    """metrics/history.csv: one row per epoch, at least epoch and loss; the kernel columns
    are absent for a filter with no true kernel."""
    return _read_metrics_table(paths.HISTORY, ["epoch", "loss"])


def write_steps(steps: pd.DataFrame) -> None:
    """metrics/steps.csv: one row per kernel snapshot in model/kernels.npy, the columns
    of STEPS_COLUMNS (whole numbers), then the kernel errors when there is a true kernel."""
    missing = set(STEPS_COLUMNS) - set(steps.columns)
    if missing:
        raise ValueError(f"the steps table lacks {', '.join(sorted(missing))}")
    columns = _table_columns(steps, STEPS_COLUMNS + STEPS_ERROR_COLUMNS)
    table = steps.reindex(columns=columns).astype({"step": int, "epoch": int})
    with atomic_file(paths.STEPS) as handle:
        table.to_csv(handle, index=False, float_format="%.6g")


def read_steps() -> pd.DataFrame:
    """metrics/steps.csv: step, epoch, kernel_mse, kernel_rel_error per kernel snapshot,
    the steps whole numbers rising from 0 or more."""
    steps = _read_metrics_table(paths.STEPS, ["step", "epoch"])  # kernel columns may be absent
    counts = steps[["step", "epoch"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    whole = np.all(counts >= 0) and np.all(counts == np.round(counts))
    if not (whole and np.all(np.diff(counts[:, 0]) > 0)):
        raise UserError(
            f"{paths.STEPS}: step and epoch must be whole numbers from 0, step rising; "
            "rerun training with `dvc repro -f train`"
        )
    return steps.astype({"step": int, "epoch": int})


def write_train_metrics(metrics: dict) -> None:
    write_json(paths.TRAIN_METRICS, metrics)


def read_train_metrics() -> dict:
    """metrics/train.json, the run's once-per-run numbers; {} if it is missing or damaged
    (it only adds reference lines to the figures)."""
    try:
        doc = json.loads(paths.TRAIN_METRICS.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_grayscale_metrics(metrics: dict) -> None:
    write_json(paths.GRAYSCALE_METRICS, metrics)
