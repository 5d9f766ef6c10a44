"""Visualize stage: the kernel converging, learned vs true vs the closed form, one
validation image through the learned layer, and the training curves; all four also go
into the training's MLflow run.

Reads model/ (the learned kernel and biases, the kernel snapshots, the closed-form
kernel, the MLflow run), metrics/history.csv, steps.csv and train.json, data/filtered
(the true kernel if there is one, the targets and filter.json), data/gray and, for the
colour original of a gray run, data/raw/images. Writes figures/:
  convergence.gif  the learned kernel at every snapshot step beside the true one (the
                   closed-form one for a filter with no true kernel)
  comparison.png   true | learned | closed form on one colour scale, differences on their own
  sample.png       the first validation image: original, input, target, prediction, residual
  curves.png       kernel_rel_error per snapshot step, and every per-epoch metric, with the
                   closed form's as reference lines

Its floor is its imports (numpy, pandas, Pillow, matplotlib) and the drawing. No
TensorFlow: the prediction is the learned layer computed here with numpy's FFT. No
SciPy, and no MLflow when the run keeps its artifacts in a local folder (run.json's
artifact_uri): MLflow stores those as plain files, so they are copied there directly.
"""

import contextlib
import logging
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from src import figures, images, paths, stage_files
from src.atomic import atomic_dir
from src.errors import UserError, run_stage
from src.padding import same_padding, target_offset

log = logging.getLogger("visualize")

ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),  # no overflow at large |x|
    "tanh": np.tanh,
}


def sample_row(splits: list[str]) -> int:
    """The first validation image; the first image if there is none."""
    if "val" in splits:
        return splits.index("val")
    log.warning("no validation images (data.val_fraction is 0); showing a training image")
    return 0


def window_centre(kernel_shape: tuple[int, int], padding: str) -> tuple[float, float]:
    """Where target pixel (0, 0)'s kernel window is centred in the input, (row, column)."""
    top, left = target_offset(kernel_shape, padding)
    return (kernel_shape[0] - 1) / 2 - top, (kernel_shape[1] - 1) / 2 - left


def layer_output(
    image: np.ndarray,
    kernel: np.ndarray,
    biases: list[float],
    padding: str,
    activation: str = "linear",
) -> np.ndarray:
    """What the learned Conv2D outputs for one (H, W) or (H, W, C) image: (H', W', F).

    activation(Σ_c correlate(image[..., c], kernel[..., c, f]) + bias[f]), the
    correlation as a product of FFTs of the (padded) image's size: its circular
    wrap-around touches only the rows and columns that 'valid' drops.
    """
    x = np.asarray(image, dtype=np.float64)
    x = x[..., None] if x.ndim == 2 else x
    kh, kw = kernel.shape[:2]
    if padding == "same":
        x = np.pad(x, (*same_padding(kh, kw), (0, 0)))
    size = x.shape[:2]
    spectrum = np.einsum(
        "ijc,ijcf->ijf",
        np.fft.rfft2(x, s=size, axes=(0, 1)),
        np.fft.rfft2(kernel[::-1, ::-1], s=size, axes=(0, 1)),  # correlate = convolve flipped
    )
    full = np.fft.irfft2(spectrum, s=size, axes=(0, 1))
    return ACTIVATIONS[activation](full[kh - 1 :, kw - 1 :] + np.asarray(biases))


def read_original(name: str, size: int) -> np.ndarray | None:
    """The raw image fitted as the grayscale stage fits it, or None if it is not in
    colour (then the grayscale says it all) or is gone."""
    path = paths.RAW_IMAGES / name
    if not path.is_file():
        log.warning("%s is missing; the sample figure goes without the original", path)
        return None
    rgb = np.asarray(images.read_rgb_fitted(path, size))
    return rgb if np.ptp(rgb, axis=-1).any() else None


def local_artifacts(run: dict) -> Path | None:
    """The run's artifact folder, if run.json names one on this machine that exists;
    None for a tracking server's store (then MLflow logs the figures)."""
    uri = run.get("artifact_uri")
    if not isinstance(uri, str):
        return None
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    folder = Path(url2pathname(parsed.path))
    return folder if folder.is_dir() else None


@contextlib.contextmanager
def training_run(run: dict):
    """Where the figures go: the run's local artifact folder, or, when it has none,
    the run reopened in MLflow before the work, so that a bad store fails at once."""
    folder = local_artifacts(run)
    if folder is not None:
        yield lambda: shutil.copytree(paths.FIGURES, folder / "figures", dirs_exist_ok=True)
        return
    import mlflow  # only here: its import costs more than drawing every figure

    from src import tracking

    with tracking.resume_run(run["run_id"]):
        yield lambda: mlflow.log_artifacts(str(paths.FIGURES), artifact_path="figures")


def read_training() -> dict:
    """Everything the figures need from the train and filter stages, checked to agree."""
    info = stage_files.read_filter_info()
    learned, biases = stage_files.read_learned_layer()
    kernels = stage_files.read_kernel_snapshots()
    true_kernel = stage_files.read_true_kernel()
    lstsq = stage_files.read_lstsq_kernel()
    steps = stage_files.read_steps()
    shapes = {
        paths.LSTSQ_KERNEL: None if lstsq is None else lstsq.shape,
        paths.KERNEL: None if true_kernel is None else true_kernel.shape,
    }
    if (
        len(kernels) != len(steps)
        or kernels.shape[1:] != learned.shape
        or any(shape not in (None, learned.shape) for shape in shapes.values())
    ):
        raise UserError(
            f"{paths.KERNEL_HISTORY} {kernels.shape}, {paths.STEPS} ({len(steps)} snapshots), "
            f"{paths.LEARNED_KERNEL} {learned.shape}"
            + "".join(f", {path} {shape}" for path, shape in shapes.items() if shape)
            + " don't match; rerun training with `dvc repro -f train`"
        )
    return dict(
        info=info,
        names=list(info.names) or [info.kernel],
        learned=learned,
        biases=biases,
        kernels=kernels,
        true_kernel=true_kernel,
        lstsq=lstsq,
        steps=steps,
        history=stage_files.read_history(),
        final=stage_files.read_train_metrics(),
    )


def main() -> None:
    stage_files.require_inputs("visualize")
    run = stage_files.read_run()
    if run.get("tracking_uri") and run["tracking_uri"] != paths.tracking_uri():
        log.warning(
            "training logged to %s, but the tracking URI is now %s",
            run["tracking_uri"],
            paths.tracking_uri(),
        )

    with training_run(run) as log_figures:
        t = read_training()
        info, learned, true_kernel, lstsq = t["info"], t["learned"], t["true_kernel"], t["lstsq"]
        index = stage_files.read_index()
        names, splits = index["name"].tolist(), index["split"].tolist()
        row = sample_row(splits)
        with stage_files.open_inputs() as grays:  # the coarse images with rescale
            image = grays[row]
        with stage_files.open_targets() as targets:
            target = targets[row]
        target = target[..., None] if target.ndim == 2 else target
        prediction = layer_output(image, learned, t["biases"], info.padding, info.activation)
        if prediction.shape != target.shape:
            raise UserError(
                f"the learned kernel predicts {prediction.shape} for {names[row]}, but its "
                f"target is {target.shape}; rerun with `dvc repro -f filter train`"
            )
        colour = image.ndim == 3 and image.shape[2] == 3
        original = None if colour else read_original(names[row], image.shape[0])

        final = t["final"]
        rel_error = final.get("kernel_rel_error")
        if rel_error is None and "kernel_rel_error" in t["steps"]:
            rel_error = float(t["steps"]["kernel_rel_error"].iloc[-1])
        reference, reference_title = (
            (true_kernel, "true kernel")
            if true_kernel is not None
            else (lstsq, "closed-form least squares")
        )
        with atomic_dir(paths.FIGURES) as out:
            frames, shown = figures.convergence_frames(
                t["kernels"], t["steps"], reference, t["names"], reference_title
            )
            figures.write_gif(frames, out / "convergence.gif")
            pictures = {
                "comparison.png": figures.comparison(
                    learned,
                    true_kernel,
                    lstsq,
                    t["names"],
                    rel_error if true_kernel is not None else None,
                    final.get("lstsq_kernel_rel_error") if true_kernel is not None else None,
                    t["biases"],
                    {name: final.get(f"kernel_rel_error/{name}") for name in t["names"]},
                ),
                "sample.png": figures.sample_strip(
                    image,
                    target,
                    prediction,
                    original,
                    window_centre(learned.shape[:2], info.padding),
                    title=f"{names[row]} ({splits[row]}), {info.padding} padding",
                    names=t["names"],
                ),
                "curves.png": figures.curves(t["history"], t["steps"], final),
            }
            for name, fig in pictures.items():
                fig.savefig(out / name, dpi=figures.DPI)
        log_figures()

    gif_kb = (paths.FIGURES / "convergence.gif").stat().st_size / 1024
    log.info(
        "%s: convergence.gif (%d frames of %d kernel snapshots, steps %d to %d, %.0f KB), "
        "%s; sample image %s",
        paths.FIGURES,
        len(shown),
        len(t["kernels"]),
        shown[0],
        shown[-1],
        gif_kb,
        ", ".join(pictures),
        names[row],
    )
    log.info("logged them under figures/ in MLflow run %s", run["run_id"])


if __name__ == "__main__":
    run_stage(main)
