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
Activation = Literal["linear", "relu", "sigmoid", "tanh"]
OPERATIONS = get_args(Operation)
PADDINGS = get_args(Padding)
ACTIVATIONS = get_args(Activation)
RESCALES = (1, 2, 4)

# Each image is a size² float32 array (64 MB at 4096) and the filter and train stages hold
# several at once; no kernel or Gaussian can be wider than the images.
DATA_SIZE_MAX = 4096
COUNT_MAX = 1_000_000  # synthetic images: about 200 GB of PNGs at 256², far past any use
# A Gaussian narrower than a tenth of a pixel samples as one pixel (an even-sized one as 0/0);
# one wider than any image is flat over it. Covariances are held to the same range.
SIGMA_MIN, SIGMA_MAX = 0.1, DATA_SIZE_MAX
# The filter stage holds one block of images in float64 with their targets and the FFT's
# buffers: about (C + 3F + 4) planes of 8 bytes per fine pixel (measured: 0.9 GB for sobel_x
# at 4096², 1.6 GB for [red, green, blue] at 2048² with rescale 2). A bank too large for
# this many bytes at the size asked for is refused, so that the stage stays under 4 GB.
FILTER_IMAGE_BYTES_MAX = 3 * 2**30


def filter_image_bytes(side: int, channels: int, filters: int) -> int:
    """What the filter stage holds for one side×side image (the fine side, with rescale)."""
    return 8 * side * side * (channels + 3 * filters + 4)


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


def _rank_size(default: int):
    """A median, max or min filter's size: odd, so that its window has a centre pixel."""

    class RankSettings(Section):
        size: Whole = Field(default, ge=3, le=DATA_SIZE_MAX)  # odd: KernelSettings checks

    return RankSettings


MedianSettings, MaxSettings, MinSettings = _rank_size(5), _rank_size(3), _rank_size(3)


class KernelSettings(Section):
    box: BoxSettings = BoxSettings()
    gaussian: GaussianSettings = GaussianSettings()
    median: MedianSettings = MedianSettings()
    max: MaxSettings = MaxSettings()
    min: MinSettings = MinSettings()

    @model_validator(mode="before")
    @classmethod
    def _name_the_rank_filter(cls, value: Any) -> Any:
        # the odd-size message names its filter: kernels.median.size, not kernels.<filter>
        if isinstance(value, dict):
            for name in kernels.RANK_FILTERS:
                size = (
                    value.get(name, {}).get("size") if isinstance(value.get(name), dict) else None
                )
                size = _integral_float_to_int(size)
                if type(size) is int and size >= 3 and size % 2 == 0:
                    raise ValueError(
                        f"kernels.{name}.size must be odd (3, 5, 7, …) so that the window has "
                        f"a centre pixel; got {size}: use {size - 1} or {size + 1}"
                    )
        return value


class DataConfig(Section):
    source: str = "synthetic"
    count: Whole = Field(512, ge=1, le=COUNT_MAX)
    limit: Whole = Field(0, ge=0)
    size: Whole = Field(256, ge=8)  # at most DATA_SIZE_MAX, with the reason: _fits_in_memory
    val_fraction: Number = Field(0.2, ge=0, le=0.9)
    categories: tuple[str, ...] = ()
    sha256: str = ""
    max_bad_fraction: Number = Field(0.05, ge=0, le=1)
    channels: Literal[1, 3] = 1  # 3: RGB images and colour kernels

    @field_validator("channels", mode="before")
    @classmethod
    def _one_or_three(cls, value: Any) -> Any:
        value = _integral_float_to_int(value)
        if type(value) is not int or value not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB); got {value!r}")
        return value

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
    activation: Activation = "linear"  # after the conv, before the noise
    rescale: Literal[1, 2, 4] = 1  # the target is made at rescale× resolution, then reduced

    @field_validator("rescale", mode="before")
    @classmethod
    def _a_power_of_two(cls, value: Any) -> Any:
        value = _integral_float_to_int(value)
        if type(value) is not int or value not in RESCALES:
            raise ValueError(
                f"filter.rescale must be 1, 2 or 4 (the target's resolution over the "
                f"input's, a whole block of pixels per input pixel); got {value!r}"
            )
        return value

    @field_validator("activation", mode="before")
    @classmethod
    def _known_activation(cls, value: Any) -> Any:
        if value not in ACTIVATIONS:
            close = difflib.get_close_matches(str(value), ACTIVATIONS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(
                f"filter.activation: unknown {value!r}; {hint}choose from {', '.join(ACTIVATIONS)}"
            )
        return value


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
    solver: Literal["sgd", "lstsq"] = "sgd"  # lstsq: the closed-form least-squares filter

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


def _kernel_names(value: Any) -> tuple[str, ...]:
    """`kernel: sobel_x` or a list, `kernel: [sobel_x, sobel_y]`, as a tuple of names."""
    names = list(value) if isinstance(value, (list, tuple)) else [value]
    if not names:
        raise ValueError(
            "kernel: the list is empty; name at least one kernel, e.g. kernel: sobel_x"
        )
    for name in names:
        if not (
            isinstance(name, str)
            and (name in kernels.NAMES or name in kernels.NONLINEAR or name.startswith("file:"))
        ):
            raise ValueError(
                f"kernel: unknown kernel {name!r}; choose from "
                f"{', '.join(kernels.NAMES + kernels.NONLINEAR)}, or file:<path to .npy, "
                ".csv or image>, or a list of them"
            )
    return tuple(names)


class Params(Section):
    # a name, or a list of names (a bank of filters that one Conv2D learns at once)
    kernel: str | tuple[str, ...] = "sobel_x"
    seed: Whole = Field(0, ge=0, le=SEED_MAX)
    kernels: KernelSettings = KernelSettings()
    data: DataConfig = DataConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("kernel", mode="before")
    @classmethod
    def _known_kernel(cls, value: Any) -> str | tuple[str, ...]:
        names = _kernel_names(value)
        if len(names) > kernels.BANK_MAX:
            raise ValueError(
                f"kernel: a bank of {len(names)} filters, more than the {kernels.BANK_MAX} "
                f"allowed; list at most {kernels.BANK_MAX}"
            )
        seen = {kernels.label(name): name for name in names}
        if len(seen) < len(names):
            twice = next(
                kernels.label(n)
                for i, n in enumerate(names)
                if kernels.label(n) in map(kernels.label, names[:i])
            )
            raise ValueError(
                f"kernel: {twice} is listed twice; each filter of a bank needs its own name "
                "(a file: kernel is named by its file stem)"
            )
        return value if isinstance(value, str) else names

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """The kernels of `kernel`, one per filter, as written in params.yaml."""
        return (self.kernel,) if isinstance(self.kernel, str) else self.kernel

    @property
    def filter_names(self) -> list[str]:
        """One name per filter, as metrics and pictures show them (a file: by its stem)."""
        return [kernels.label(name) for name in self.kernel_names]

    @property
    def kernel_label(self) -> str:
        """`kernel` as one string: the names joined by ","."""
        return ",".join(self.kernel_names)

    @property
    def linear(self) -> bool:
        """Whether a true kernel exists: every filter of the bank is linear."""
        return all(kernels.is_linear(name) for name in self.kernel_names)

    @model_validator(mode="after")
    def _solver_fits(self) -> Params:
        if self.train.solver == "lstsq" and self.filter.activation != "linear":
            raise ValueError(
                f"train.solver lstsq is the closed-form filter of a linear layer, and "
                f"filter.activation is {self.filter.activation}; set train.solver sgd, or "
                "filter.activation linear"
            )
        return self

    @model_validator(mode="after")
    def _kernel_fits(self) -> Params:
        names = self.kernel_names
        nonlinear = [name for name in names if not kernels.is_linear(name)]
        if nonlinear and len(names) > 1:
            raise ValueError(
                f"kernel: {nonlinear[0]} is a non-linear filter and cannot be in a bank: "
                "it has no true kernel to learn beside the others; give it alone"
            )
        if nonlinear:
            if self.data.channels != 1:
                raise ValueError(f"kernel: {nonlinear[0]} filters gray images; set data.channels 1")
            if self.filter.activation != "linear":
                raise ValueError(
                    f"filter.activation {self.filter.activation} after {nonlinear[0]}, which "
                    "is already non-linear, is refused; set filter.activation linear"
                )
        else:
            # A file: kernel's UserError is no ValueError, so it passes through pydantic as is.
            channels = {name: kernels.channels(name, self.kernels) for name in names}
            if len(set(channels.values())) > 1:
                gray = next(n for n, c in channels.items() if c == 1)
                colour = next(n for n, c in channels.items() if c == 3)
                raise ValueError(
                    f"kernel: the bank mixes gray and colour kernels ({gray} takes 1 channel, "
                    f"{colour} takes 3); list kernels of one channel count"
                )
            (taken,) = set(channels.values())
            if taken != self.data.channels:
                name = names[0]
                fix = (
                    "set data.channels 3, or choose a gray kernel"
                    if taken == 3
                    else "set data.channels 1, or use a (k, k, 3) kernel such as red"
                )
                raise ValueError(
                    f"kernel: {name} is a {'colour' if taken == 3 else '2-D gray'} kernel "
                    f"(it takes {taken} channel{'s' if taken > 1 else ''}), but "
                    f"data.channels is {self.data.channels}; {fix}"
                )
        # The shape only, so a large box or Gaussian is not built just to be refused.
        shapes = [kernels.shape(name, self.kernels) for name in names]
        kh, kw = max(h for h, _ in shapes), max(w for _, w in shapes)
        what = names[0] if len(names) == 1 else f"the bank [{self.kernel_label}]"
        need = max(kh, kw) + 2  # the Laplacian whitening trims 2 pixels off a crop's target
        size = self.data.size
        if size < need:
            raise ValueError(
                f"kernel: {what} is {kh}×{kw}, too large for the {size}×{size} images: "
                f"training needs images of at least the kernel size + 2 ({need}); "
                "raise data.size or choose a smaller kernel"
            )
        if self.train.crop_side(size) < need:
            raise ValueError(
                f"train.crop must be 0 or at least the kernel size + 2 ({need}), "
                f"got {self.train.crop}"
            )
        rescale = self.filter.rescale
        if rescale > 1:
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(
                    f"filter.rescale {rescale} needs an odd-sized kernel: {what} is {kh}×{kw}, "
                    "and an even kernel's centre falls between the fine pixels; use "
                    "filter.rescale 1 or an odd-sized kernel"
                )
            if size * rescale > DATA_SIZE_MAX:
                raise ValueError(
                    f"filter.rescale {rescale} makes the targets at {size * rescale}² pixels, "
                    f"more than the {DATA_SIZE_MAX}² the data stages hold; lower data.size to "
                    f"{DATA_SIZE_MAX // rescale} or less, or filter.rescale"
                )
        fine, filters = size * rescale, len(names)
        if filter_image_bytes(fine, self.data.channels, filters) > FILTER_IMAGE_BYTES_MAX:
            most = next(
                f
                for f in range(filters, 0, -1)
                if filter_image_bytes(fine, self.data.channels, f) <= FILTER_IMAGE_BYTES_MAX
            )
            raise ValueError(
                f"kernel: a bank of {filters} filters on {fine}×{fine} images needs "
                f"{filter_image_bytes(fine, self.data.channels, filters) / 2**30:.1f} GB per "
                f"image in the filter stage; list at most {most} at this size, or lower data.size"
            )
        return self

    def true_kernel(self) -> np.ndarray | None:
        """The (kh, kw, C, F) bank named by `kernel`, float64, before any flip for convolve;
        None for a non-linear filter, which has none."""
        return kernels.bank(self.kernel_names, self.kernels) if self.linear else None


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
        return f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}"
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
