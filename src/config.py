"""params.yaml as typed, frozen pydantic models: read and validated once, at the boundary.

The models hold every default and every bound. A bad value or an unknown key
becomes one UserError line that names the dotted key, what it holds and what is
allowed, so `dvc exp run -S train.max_steps=abc` fails with a message, not a
traceback.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from src import kernels
from src.errors import UserError

MIT_CATEGORIES = (
    "coast",
    "forest",
    "highway",
    "insidecity",
    "mountain",
    "opencountry",
    "street",
    "tallbuilding",
)
Operation = Literal["correlate", "convolve"]
Padding = Literal["valid", "same"]
OPERATIONS = get_args(Operation)
PADDINGS = get_args(Padding)

# Each image is a size² float32 array (64 MB at 4096) and the filter and train stages hold
# several at once; no kernel or Gaussian can be wider than the images.
DATA_SIZE_MAX = 4096
COUNT_MAX = 1_000_000  # synthetic images: about 200 GB of PNGs at 256², far past any use
# A Gaussian narrower than a tenth of a pixel samples as one pixel (an even-sized one as 0/0);
# one wider than any image is flat over it. Covariances are held to the same range.
SIGMA_MIN, SIGMA_MAX = 0.1, DATA_SIZE_MAX
SEED_MAX = 2**32 - 1  # keras.utils.set_random_seed refuses larger seeds


def _integral_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict, so that True and "3" are refused; an integral float (3.0) is still a whole number.
Whole = Annotated[int, BeforeValidator(_integral_float_to_int), Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # ints are accepted


class Section(BaseModel):
    """Every level of params.yaml: no unknown keys, no changes after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, value: Any) -> Any:
        return {} if value is None else value  # `train:` with nothing under it


class BoxSettings(Section):
    size: Whole = Field(5, ge=1, le=DATA_SIZE_MAX)


class GaussianSettings(Section):
    size: Whole = Field(7, ge=1, le=DATA_SIZE_MAX)
    sigma: Number = 1.5
    covariance: tuple[tuple[float, float], tuple[float, float]] | None = None  # replaces sigma

    @field_validator("sigma")
    @classmethod
    def _in_range(cls, sigma: float) -> float:
        if not SIGMA_MIN <= sigma <= SIGMA_MAX:
            raise ValueError(
                f"kernels.gaussian.sigma must be from {SIGMA_MIN:g} to {SIGMA_MAX:g} pixels "
                f"(narrower is one pixel, wider is flat), got {sigma:g}"
            )
        return sigma

    @field_validator("covariance", mode="before")
    @classmethod
    def _positive_definite(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            cov = np.asarray(value, dtype=np.float64)
            ok = cov.shape == (2, 2) and bool(np.all(np.isfinite(cov))) and np.allclose(cov, cov.T)
            variances = np.linalg.eigvalsh(cov) if ok else None
        except (TypeError, ValueError):
            ok = False
        if not ok or variances[0] <= 0:
            raise ValueError(
                "kernels.gaussian.covariance must be a symmetric positive-definite "
                f"[[sxx, sxy], [sxy, syy]] or null, got {value!r}"
            )
        # Bounding each principal axis as sigma is bounded also bounds the condition number.
        stds = np.sqrt(variances)
        if stds[0] < SIGMA_MIN or stds[1] > SIGMA_MAX:
            raise ValueError(
                "kernels.gaussian.covariance must have principal standard deviations (the "
                f"square roots of its eigenvalues) from {SIGMA_MIN:g} to {SIGMA_MAX:g} pixels, "
                f"like sigma; it has {stds[0]:.3g} and {stds[1]:.3g}: {value!r}"
            )
        return cov.tolist()


class KernelSettings(Section):
    box: BoxSettings = BoxSettings()
    gaussian: GaussianSettings = GaussianSettings()


class DataConfig(Section):
    source: str = "synthetic"
    count: Whole = Field(512, ge=1, le=COUNT_MAX)
    limit: Whole = Field(0, ge=0)
    size: Whole = Field(256, ge=8)  # at most DATA_SIZE_MAX, with the reason: _fits_in_memory
    val_fraction: Number = Field(0.2, ge=0, le=0.9)
    categories: tuple[str, ...] = ()
    sha256: str = ""
    max_bad_fraction: Number = Field(0.05, ge=0, le=1)

    @field_validator("source")
    @classmethod
    def _not_blank(cls, source: str) -> str:
        if not source.strip():
            raise ValueError(
                "data.source must be synthetic, mit_scenes, samples, or a path to a folder "
                f"or .zip of images; got {source!r}"
            )
        return source.strip()

    @field_validator("size")
    @classmethod
    def _fits_in_memory(cls, size: int) -> int:
        if size > DATA_SIZE_MAX:
            raise ValueError(
                f"data.size must be at most {DATA_SIZE_MAX}, got {size}: each image is held as "
                f"size² float32 values ({4 * size**2 / 2**20:,.0f} MB at {size}) and the filter "
                "and train stages hold several at once; lower data.size"
            )
        return size

    @field_validator("categories", mode="before")
    @classmethod
    def _known_categories(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):  # `-S data.categories=forest,street`
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"data.categories must be a list of MIT scene categories, got {value!r}"
            )
        unknown = [str(c) for c in value if c not in MIT_CATEGORIES]
        if unknown:
            raise ValueError(
                f"data.categories: unknown {', '.join(unknown)}; "
                f"choose from {', '.join(MIT_CATEGORIES)}"
            )
        return tuple(value)

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_digest(cls, value: Any) -> str:
        value = "" if value is None else value  # `-S data.sha256=` writes null
        digest = value.strip().lower() if isinstance(value, str) else None
        if digest is None or (digest and not re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ValueError(f"data.sha256 must be 64 hex digits or empty, got {value!r}")
        return digest


class FilterConfig(Section):
    operation: Operation = "correlate"
    padding: Padding = "valid"
    noise_std: Number = Field(0.0, ge=0)


# train.recipe: original is the seed's own training; these are the keys it sets
ORIGINAL_RECIPE = {
    "batch_size": 1,
    "learning_rate": 1e-3,
    "optimizer": "adam",
    "precondition": "none",
    "whiten": "none",
    "crop": 0,
}


class TrainConfig(Section):
    recipe: Literal["fast", "original"] = "fast"  # original: the seed's (ORIGINAL_RECIPE)
    max_steps: Whole = Field(2000, ge=1, le=10**7)  # the cap; stopping here warns
    tolerance: Number = Field(1e-5, gt=0, lt=1)  # converged: an epoch moves the kernel less
    min_epoch_steps: Whole = Field(16, ge=1, le=10**6)  # few images: an epoch draws more crops
    batch_size: Whole = Field(16, ge=1)
    learning_rate: Number = Field(0.8, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    precondition: Literal["kfac", "none"] = "kfac"
    conv: Literal["auto", "direct", "fft"] = "auto"
    whiten: Literal["gradient", "laplacian", "none"] = "gradient"
    crop: Whole = Field(128, ge=0)
    devices: int | Literal["all"] = 1  # GPUs (or logical CPUs) to train on; src/training/

    @model_validator(mode="after")
    def _recipe_is_whole(self) -> TrainConfig:
        if self.recipe == "original":
            fields = type(self).model_fields
            for key, value in ORIGINAL_RECIPE.items():
                if getattr(self, key) != fields[key].default:
                    raise ValueError(
                        f"train.recipe original sets train.{key} to {value} itself; leave "
                        f"train.{key} at {fields[key].default}, or use train.recipe fast"
                    )
        return self

    def effective(self) -> TrainConfig:
        """The settings training uses: these, or the original recipe's."""
        if self.recipe == "original":
            return self.model_copy(update=ORIGINAL_RECIPE)
        return self

    @field_validator("devices", mode="before")
    @classmethod
    def _device_count(cls, value: Any) -> int | str:
        value = _integral_float_to_int(value)
        if value == "all" or (type(value) is int and value >= 1):
            return value
        raise ValueError(f"train.devices must be a whole number from 1, or all; got {value!r}")

    def crop_side(self, image_size: int) -> int:
        """The side of the crops training takes (src/training/, crops): whole images
        when crop is 0 or not smaller than them."""
        return self.crop if 0 < self.crop < image_size else image_size


# MLflow keeps registered model names in a 256-character column (PostgreSQL enforces it)
REGISTERED_NAME_MAX = 256


class MlflowConfig(Section):
    experiment: str = Field("learn-linear-filter", min_length=1)
    registered_model: str = ""  # empty: off; else each converged run registers a new version
    register_unconverged: bool = False  # true: runs that did not converge register too

    @field_validator("registered_model")
    @classmethod
    def _a_model_name(cls, name: str) -> str:
        # MLflow's own rules (mlflow.utils.validation._validate_model_name), checked here:
        # MLflow refuses these only after training, when the run is already spent
        if not name:
            return name
        shown = repr(name) if len(name) <= 40 else f"{name[:37]!r}..."
        norm = posixpath.normpath(name)
        if name != name.strip() or "/" in name or ":" in name:
            problem = "a name without '/', ':' or surrounding spaces, or empty"
        elif norm != name or norm == "." or norm.startswith(("..", "/")):
            problem = "a name that MLflow does not read as a path, or empty"
        elif len(name) > REGISTERED_NAME_MAX:
            problem = f"at most {REGISTERED_NAME_MAX} characters (MLflow's limit), not {len(name)}"
        else:
            return name
        raise ValueError(f"mlflow.registered_model must be {problem}; got {shown}")


class Params(Section):
    kernel: str = "sobel_x"
    seed: Whole = Field(0, ge=0, le=SEED_MAX)
    kernels: KernelSettings = KernelSettings()
    data: DataConfig = DataConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("kernel", mode="before")
    @classmethod
    def _known_kernel(cls, name: Any) -> str:
        if isinstance(name, str) and (name in kernels.NAMES or name.startswith("file:")):
            return name
        raise ValueError(
            f"kernel: unknown kernel {name!r}; choose from "
            f"{', '.join(kernels.NAMES)}, or file:<path to .npy, .csv or image>"
        )

    @model_validator(mode="after")
    def _kernel_fits(self) -> Params:
        # The shape only, so a large box or Gaussian is not built just to be refused.
        # A file: kernel's UserError is no ValueError, so it passes through pydantic as is.
        kh, kw = kernels.shape(self.kernel, self.kernels)
        need = max(kh, kw) + 2  # the Laplacian whitening trims 2 pixels off a crop's target
        size = self.data.size
        if size < need:
            raise ValueError(
                f"kernel: {self.kernel} is {kh}×{kw}, too large for the {size}×{size} images: "
                f"training needs images of at least the kernel size + 2 ({need}); "
                "raise data.size or choose a smaller kernel"
            )
        if self.train.crop_side(size) < need:
            raise ValueError(
                f"train.crop must be 0 or at least the kernel size + 2 ({need}), "
                f"got {self.train.crop}"
            )
        return self

    def true_kernel(self) -> np.ndarray:
        """The kernel named by `kernel`, as float64, before any flip for convolve."""
        return kernels.make(self.kernel, self.kernels)


# --- a ValidationError as one line ------------------------------------------------


def _model_at(loc: tuple) -> type[BaseModel]:
    model = Params
    for name in loc:
        model = model.model_fields[name].annotation
    return model


# keys that earlier versions had, with what replaced them
RETIRED = {
    "train.epochs": "training stops when converged now; cap it with train.max_steps",
}


def _unknown_key(loc: tuple) -> str:
    *parents, key = loc
    prefix = "".join(f"{name}." for name in parents)
    if f"{prefix}{key}" in RETIRED:
        return f"{prefix}{key}: no longer a setting; {RETIRED[f'{prefix}{key}']}"
    valid = list(_model_at(tuple(parents)).model_fields)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"choose from {', '.join(valid)}"
    return f"{prefix}{key}: unknown setting; {hint}"


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _describe(error: dict) -> str:
    loc, kind, value, ctx = error["loc"], error["type"], error["input"], error.get("ctx", {})
    key = ".".join(map(str, loc))
    if kind == "value_error":
        return str(ctx["error"])  # our validators write the whole line, key included
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "literal_error":
        choices = get_args(_model_at(loc[:-1]).model_fields[loc[-1]].annotation)
        return f"{key} must be one of {', '.join(choices)}; got {value!r}"
    allowed = {
        "int_type": "a whole number",
        "float_type": "a number",
        "finite_number": "a finite number",
        "string_type": "text",
        "string_too_short": "a non-empty name",
        "model_type": "a mapping of settings",
        "greater_than": f"greater than {_shown(ctx.get('gt'))}",
        "greater_than_equal": f"at least {_shown(ctx.get('ge'))}",
        "less_than_equal": f"at most {_shown(ctx.get('le'))}",
        "less_than": f"less than {_shown(ctx.get('lt'))}",
    }.get(kind)
    if allowed is None:
        return f"{key}: {error['msg']}, got {_shown(value)}"
    return f"{key} must be {allowed}, got {_shown(value)}"


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _describe(errors[0]) + more


# --- reading params.yaml --------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-05` (as `dvc exp run -S` writes it) is a string;
    YAML 1.2, which DVC reads, makes it a float."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def parse(doc: Any) -> Params:
    """Validate a parsed params.yaml document."""
    if not isinstance(doc, dict):
        raise UserError(
            "params.yaml must be a mapping of keys to values; restore it from git "
            "with `git checkout params.yaml`"
        )
    try:
        return Params.model_validate(doc)
    except ValidationError as exc:
        raise UserError(_one_line(exc)) from None


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} not found; run from the repository root") from None
    try:
        doc = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"{path} is not valid YAML{where}; fix it or restore it with `git checkout {path}`"
        ) from None
    return parse(doc)


def flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'max_steps': 3}} -> {'train.max_steps': 3}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
