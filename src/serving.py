"""The learned filter as an MLflow Model: saved with the TensorFlow/Keras flavour, served
through LearnedFilter, which predicts silently and says in one line what it takes.

    mlflow.pyfunc.load_model(uri).predict(images)   # (N, H, W, C) float32 -> (N, H', W', F)
    mlflow models predict -m <uri> -i images.json -t json --env-manager local

MLflow checks a signature before the model sees its input, and its error quotes the
whole input array, over many lines. The signature is saved as MLflow saves a type-hinted
model's (is_signature_from_type_hint), so MLflow leaves that check to
LearnedFilter.predict; the model page shows the same signature. Keras's own predict
prints a progress bar on stdout, which `mlflow models predict -t json` shares with the
JSON: LearnedFilter predicts with verbose=0. src/ travels with the model (whole: loading
the model puts its copy first on sys.path, and a process that imports src afterwards gets
that copy), so it loads where only MLflow and our requirements are installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import numpy as np
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

LOADER = "src.serving"  # the pyfunc loader_module: _load_pyfunc below
BATCH = 8  # images per Keras predict batch


class InputError(MlflowException, click.ClickException):
    """An input the model can't take: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 from
    `mlflow models serve`), and on MLflow's command line one `Error: ...` line, as click
    shows its own usage errors, not a traceback."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, INVALID_PARAMETER_VALUE)
        self.exit_code = 1


class LearnedFilter:
    """The pyfunc model: a Keras model with one conv layer named "conv"."""

    def __init__(self, keras_model):
        self.model = keras_model
        conv = keras_model.get_layer("conv")
        self.kernel_size = tuple(int(s) for s in conv.kernel_size)
        self.padding = conv.padding
        # from the kernel (kh, kw, C, F): FFTConv2D's output_shape has no channel count
        self.channels, self.filters = (int(s) for s in conv.kernel.shape[2:])

    def get_raw_model(self):
        return self.model

    def takes(self) -> str:
        kh, kw = self.kernel_size if self.padding == "valid" else (1, 1)
        return (
            f"a batch of float32 images shaped (N, H, W, {self.channels}), N >= 1, "
            f"H >= {kh}, W >= {kw}, and gives (N, H', W', {self.filters})"
        )

    def problem(self, x: np.ndarray) -> str | None:
        kh, kw = self.kernel_size if self.padding == "valid" else (1, 1)
        if x.ndim == 0 or x.shape[0] == 0:
            return f"got an empty batch (shape {x.shape})"
        if x.ndim != 4:
            return f"got an array of shape {x.shape}"
        if x.shape[-1] != self.channels:
            return f"got {x.shape[-1]} channels (shape {x.shape})"
        if x.shape[1] < kh or x.shape[2] < kw:
            return f"got {x.shape[1]}×{x.shape[2]} images, smaller than the {kh}×{kw} kernel"
        return None

    def predict(self, data, params=None) -> np.ndarray:
        try:
            x = np.asarray(getattr(data, "values", data), dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(
                f"this model takes {self.takes()}; got {type(data).__name__} that is not "
                "an array of numbers of one shape"
            ) from None
        problem = self.problem(x)
        if problem:
            raise InputError(f"this model takes {self.takes()}; {problem}")
        return self.model.predict(x, batch_size=BATCH, verbose=0)


def _load_pyfunc(path: str) -> LearnedFilter:
    """MLflow's pyfunc entry point (loader_module): the Keras flavour's model, wrapped."""
    import mlflow.tensorflow

    return LearnedFilter(mlflow.tensorflow._load_pyfunc(path).get_raw_model())


def save_model(keras_model, path: Path, mlflow_model, signature, pip_requirements) -> None:
    """Save `keras_model` at `path` as the TensorFlow/Keras flavour with `signature`, its
    pyfunc loaded by this module; `mlflow_model` (an mlflow.models.Model) gets the flavours."""
    import mlflow.pyfunc
    import mlflow.tensorflow
    from mlflow.models.model import MLMODEL_FILE_NAME

    signature._is_signature_from_type_hint = True  # LearnedFilter checks the input
    code = Path(path).parent / "code" / "src"
    shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    mlflow.tensorflow.save_model(
        keras_model,
        path,
        mlflow_model=mlflow_model,
        signature=signature,
        code_paths=[str(code)],
        pip_requirements=pip_requirements,
    )
    pyfunc = dict(mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME])
    pyfunc[mlflow.pyfunc.MAIN] = LOADER
    mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME] = pyfunc
    mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))
