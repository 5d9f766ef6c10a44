"""Visualize stage: the kernel converging, learned vs true, one validation image through
the model, and the training curves; all four also go into the training's MLflow run.

Reads model/, metrics/history.csv, data/filtered (the true kernel, the targets and
filter.json), data/gray and, for the colour original, data/raw/images. Writes figures/:
  convergence.gif  the learned kernel after every epoch beside the true one
  comparison.png   true | learned | difference on one colour scale
  sample.png       the first validation image: original, grayscale, target, prediction, residual
  curves.png       kernel_rel_error, kernel_mse, loss and val_loss per epoch
"""

from src import console

if __name__ == "__main__":  # run as a stage, not imported by a test
    console.hide_tensorflow_logs()  # before TensorFlow is imported

import logging  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from src import figures, images, layers, paths, stage_files, tracking  # noqa: E402
from src.atomic import atomic_dir  # noqa: E402
from src.errors import UserError, run_stage  # noqa: E402
from src.padding import target_offset  # noqa: E402

log = logging.getLogger("visualize")


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


def read_original(name: str, size: int) -> np.ndarray | None:
    """The raw image fitted as the grayscale stage fits it, or None if it is not in
    colour (then the grayscale says it all) or is gone."""
    path = paths.RAW_IMAGES / name
    if not path.is_file():
        log.warning("%s is missing; the sample figure goes without the original", path)
        return None
    rgb = np.asarray(images.read_rgb_fitted(path, size))
    return rgb if np.ptp(rgb, axis=-1).any() else None


def load_model():
    try:
        return layers.load_model(paths.MODEL_FILE)
    except (ValueError, OSError, TypeError) as exc:
        raise UserError(
            f"{paths.MODEL_FILE} could not be loaded ({type(exc).__name__}); "
            "rerun training with `dvc repro -f train`"
        ) from None


def main() -> None:
    stage_files.require_inputs("visualize")
    run = stage_files.read_run()
    if run.get("tracking_uri") and run["tracking_uri"] != paths.tracking_uri():
        log.warning(
            "training logged to %s, but the tracking URI is now %s",
            run["tracking_uri"],
            paths.tracking_uri(),
        )

    with tracking.resume_run(run["run_id"]):  # before the work: a bad store fails at once
        learned, kernels = stage_files.read_learned_kernels()
        true_kernel = stage_files.read_true_kernel()
        padding = stage_files.read_filter_info().padding
        history = stage_files.read_history()
        if len(kernels) != len(history) or kernels.shape[1:] != true_kernel.shape:
            raise UserError(
                f"{paths.KERNEL_HISTORY} {kernels.shape}, {paths.HISTORY} "
                f"({len(history)} epochs) and {paths.KERNEL} "
                f"{true_kernel.shape} don't match; "
                "rerun training with `dvc repro -f train`"
            )

        index = stage_files.read_index()
        names, splits = index["name"].tolist(), index["split"].tolist()
        row = sample_row(splits)
        with stage_files.open_gray_images() as grays:
            gray = grays[row]
        with stage_files.open_targets() as targets:
            target = targets[row]
        prediction = load_model()(gray[None, :, :, None], training=False).numpy()[0, :, :, 0]
        if prediction.shape != target.shape:
            raise UserError(
                f"the model outputs {prediction.shape} for {names[row]}, but its "
                f"target is {target.shape}; rerun with `dvc repro -f train`"
            )
        original = read_original(names[row], gray.shape[0])

        errors = history["kernel_rel_error"].to_numpy()
        with atomic_dir(paths.FIGURES) as out:
            frames, epochs = figures.convergence_frames(kernels, errors, true_kernel)
            figures.write_gif(frames, out / "convergence.gif")
            pictures = {
                "comparison.png": figures.comparison(true_kernel, learned, errors[-1]),
                "sample.png": figures.sample_strip(
                    gray,
                    target,
                    prediction,
                    original,
                    window_centre(true_kernel.shape, padding),
                    title=f"{names[row]} ({splits[row]}), {padding} padding",
                ),
                "curves.png": figures.curves(history),
            }
            for name, fig in pictures.items():
                fig.savefig(out / name, dpi=figures.DPI)
        mlflow.log_artifacts(str(paths.FIGURES), artifact_path="figures")

    gif_kb = (paths.FIGURES / "convergence.gif").stat().st_size / 1024
    log.info(
        "%s: convergence.gif (%d frames of %d epochs, %.0f KB), %s; sample image %s",
        paths.FIGURES,
        len(epochs),
        len(kernels),
        gif_kb,
        ", ".join(pictures),
        names[row],
    )
    log.info("logged them under figures/ in MLflow run %s", run["run_id"])


if __name__ == "__main__":
    run_stage(main)
