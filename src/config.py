"""Read params.yaml once, validate it, and hand the stages a typed, frozen config.

Every check raises UserError with one line that names the key, what it holds and
what is allowed, so `dvc exp run -S train.epochs=abc` fails with a message, not a
traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from src import kernels
from src.errors import UserError

SOURCES = ("synthetic", "mit_scenes")
MIT_CATEGORIES = ("coast", "forest", "highway", "insidecity", "mountain", "opencountry",
                  "street", "tallbuilding")
OPERATIONS = ("correlate", "convolve")
PADDINGS = ("valid", "same")
OPTIMIZERS = ("sgd", "adam")
CONVS = ("auto", "direct", "fft")
WHITENINGS = ("gradient", "laplacian", "none")


@dataclass(frozen=True)
class DataConfig:
    source: str
    count: int
    limit: int
    size: int
    val_fraction: float
    categories: tuple[str, ...]
    sha256: str
    max_bad_fraction: float


@dataclass(frozen=True)
class FilterConfig:
    operation: str
    padding: str
    noise_std: float


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    conv: str
    whiten: str
    crop: int


@dataclass(frozen=True)
class Params:
    kernel: str
    seed: int
    kernel_settings: dict[str, dict[str, Any]]
    data: DataConfig
    filter: FilterConfig
    train: TrainConfig
    mlflow_experiment: str
    raw: dict[str, Any]

    def true_kernel(self):
        """The kernel named by `kernel`, as float64, before any flip for convolve."""
        return kernels.make(self.kernel, self.kernel_settings)


# --- small typed readers: each names the key it reads in its error --------------

def _section(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"params.yaml: '{key}' must be a mapping of settings, got {value!r}")
    return value


def _int(section: dict, prefix: str, key: str, default: int, minimum: int | None = None) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{prefix}{key} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{prefix}{key} must be at least {minimum}, got {value}")
    return value


def _float(section: dict, prefix: str, key: str, default: float, *, low: float | None = None,
           high: float | None = None, low_open: bool = False) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{prefix}{key} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{prefix}{key} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise UserError(f"{prefix}{key} must be {bound}, got {value:g}")
    if high is not None and value > high:
        raise UserError(f"{prefix}{key} must be at most {high:g}, got {value:g}")
    return value


def _choice(section: dict, prefix: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = section.get(key, default)
    if value not in allowed:
        raise UserError(f"{prefix}{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _str(section: dict, prefix: str, key: str, default: str) -> str:
    value = section.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise UserError(f"{prefix}{key} must be text, got {value!r}")
    return value


# --- the sections --------------------------------------------------------------

def _data(doc: dict) -> DataConfig:
    s = _section(doc, "data")
    source = s.get("source", "synthetic")
    if not isinstance(source, str) or not source.strip():
        raise UserError("data.source must be synthetic, mit_scenes, or a path to a folder or "
                        f".zip of images; got {source!r}")
    categories = s.get("categories") or []
    if isinstance(categories, str):
        categories = [c for c in categories.replace(",", " ").split() if c]
    if not isinstance(categories, list):
        raise UserError("data.categories must be a list of MIT scene categories, "
                        f"got {categories!r}")
    unknown = [c for c in categories if c not in MIT_CATEGORIES]
    if unknown:
        raise UserError(f"data.categories: unknown {', '.join(map(str, unknown))}; "
                        f"choose from {', '.join(MIT_CATEGORIES)}")
    sha = _str(s, "data.", "sha256", "").strip().lower()
    if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise UserError(f"data.sha256 must be 64 hex digits or empty, got {sha!r}")
    return DataConfig(
        source=source.strip(),
        count=_int(s, "data.", "count", 512, minimum=1),
        limit=_int(s, "data.", "limit", 0, minimum=0),
        size=_int(s, "data.", "size", 256, minimum=8),
        val_fraction=_float(s, "data.", "val_fraction", 0.2, low=0.0, high=0.9),
        categories=tuple(categories),
        sha256=sha,
        max_bad_fraction=_float(s, "data.", "max_bad_fraction", 0.05, low=0.0, high=1.0),
    )


def _filter(doc: dict) -> FilterConfig:
    s = _section(doc, "filter")
    return FilterConfig(
        operation=_choice(s, "filter.", "operation", "correlate", OPERATIONS),
        padding=_choice(s, "filter.", "padding", "valid", PADDINGS),
        noise_std=_float(s, "filter.", "noise_std", 0.0, low=0.0),
    )


def _train(doc: dict) -> TrainConfig:
    s = _section(doc, "train")
    return TrainConfig(
        epochs=_int(s, "train.", "epochs", 8, minimum=1),
        batch_size=_int(s, "train.", "batch_size", 16, minimum=1),
        learning_rate=_float(s, "train.", "learning_rate", 0.8, low=0.0, low_open=True),
        optimizer=_choice(s, "train.", "optimizer", "sgd", OPTIMIZERS),
        conv=_choice(s, "train.", "conv", "auto", CONVS),
        whiten=_choice(s, "train.", "whiten", "gradient", WHITENINGS),
        crop=_int(s, "train.", "crop", 128, minimum=0),
    )


def parse(doc: Any) -> Params:
    """Validate a parsed params.yaml document."""
    if not isinstance(doc, dict):
        raise UserError("params.yaml must be a mapping of keys to values; restore it from git "
                        "with `git checkout params.yaml`")
    kernel = doc.get("kernel", "sobel_x")
    if not isinstance(kernel, str) or not (kernel in kernels.NAMES or kernel.startswith("file:")):
        raise UserError(f"kernel: unknown kernel {kernel!r}; choose from "
                        f"{', '.join(kernels.NAMES)}, or file:<path to .npy, .csv or image>")
    settings = _section(doc, "kernels")
    params = Params(
        kernel=kernel,
        seed=_int(doc, "", "seed", 0, minimum=0),
        kernel_settings={k: dict(v or {}) for k, v in settings.items()},
        data=_data(doc),
        filter=_filter(doc),
        train=_train(doc),
        mlflow_experiment=_str(_section(doc, "mlflow"), "mlflow.", "experiment",
                               "learn-linear-filter") or "learn-linear-filter",
        raw=doc,
    )
    shape = params.true_kernel().shape  # raises UserError for a bad kernel or its settings
    if max(shape) > params.data.size:
        raise UserError(f"kernel: {kernel} is {shape[0]}×{shape[1]}, larger than the "
                        f"{params.data.size}×{params.data.size} images; raise data.size or "
                        "choose a smaller kernel")
    crop = params.train.crop
    if crop and crop < max(shape) + 2:
        raise UserError(f"train.crop must be 0 or at least the kernel size + 2 "
                        f"({max(shape) + 2}), got {crop}")
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} not found; run from the repository root") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}; fix it or restore it with "
                        f"`git checkout {path}`") from None
    return parse(doc)


def flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
