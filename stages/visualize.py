"""Visualize stage: the kernel converging, learned vs true, one validation image through
the learned layer, and the training curves; all four also go into the training's MLflow run.

Reads model/ (the learned kernel and bias, the kernel snapshots, the MLflow run),
metrics/history.csv and metrics/steps.csv, data/filtered (the true kernel, the targets
and filter.json), data/gray and, for the colour original, data/raw/images. Writes figures/:
  convergence.gif  the learned kernel at every snapshot step beside the true one
  comparison.png   true | learned on one colour scale, their difference on its own
  sample.png       the first validation image: original, grayscale, target, prediction, residual
  curves.png       kernel_rel_error per snapshot step; kernel_rel_error, kernel_mse, loss
                   and val_loss per epoch

No TensorFlow: the prediction is the learned kernel correlated in the filter's padding,
plus the bias (src/filtering.py), which is what the Keras layer computes.
"""

import logging

import mlflow
import numpy as np

from src import figures, filtering, images, paths, stage_files, tracking
from src.atomic import atomic_dir
from src.errors import UserError, run_stage
from src.padding import target_offset

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
        learned, bias = stage_files.read_learned_layer()
        kernels = stage_files.read_kernel_snapshots()
        true_kernel = stage_files.read_true_kernel()
        padding = stage_files.read_filter_info().padding
        history = stage_files.read_history()
        steps = stage_files.read_steps()
        if (
            len(kernels) != len(steps)
            or kernels.shape[1:] != true_kernel.shape
            or learned.shape != true_kernel.shape
        ):
            raise UserError(
                f"{paths.KERNEL_HISTORY} {kernels.shape}, {paths.STEPS} "
                f"({len(steps)} snapshots), {paths.LEARNED_KERNEL} {learned.shape} and "
                f"{paths.KERNEL} {true_kernel.shape} don't match; "
                "rerun training with `dvc repro -f train`"
            )

        index = stage_files.read_index()
        names, splits = index["name"].tolist(), index["split"].tolist()
        row = sample_row(splits)
        with stage_files.open_gray_images() as grays:
            gray = grays[row]
        with stage_files.open_targets() as targets:
            target = targets[row]
        prediction = filtering.predict(gray[None], learned, bias, padding)[0]
        if prediction.shape != target.shape:
            raise UserError(
                f"the learned kernel predicts {prediction.shape} for {names[row]}, but its "
                f"target is {target.shape}; rerun with `dvc repro -f filter train`"
            )
        original = read_original(names[row], gray.shape[0])

        final_error = float(steps["kernel_rel_error"].iloc[-1])
        with atomic_dir(paths.FIGURES) as out:
            frames, shown = figures.convergence_frames(kernels, steps, true_kernel)
            figures.write_gif(frames, out / "convergence.gif")
            pictures = {
                "comparison.png": figures.comparison(true_kernel, learned, final_error, bias),
                "sample.png": figures.sample_strip(
                    gray,
                    target,
                    prediction,
                    original,
                    window_centre(true_kernel.shape, padding),
                    title=f"{names[row]} ({splits[row]}), {padding} padding",
                ),
                "curves.png": figures.curves(history, steps),
            }
            for name, fig in pictures.items():
                fig.savefig(out / name, dpi=figures.DPI)
        mlflow.log_artifacts(str(paths.FIGURES), artifact_path="figures")

    gif_kb = (paths.FIGURES / "convergence.gif").stat().st_size / 1024
    log.info(
        "%s: convergence.gif (%d frames of %d kernel snapshots, steps %d to %d, %.0f KB), "
        "%s; sample image %s",
        paths.FIGURES,
        len(shown),
        len(kernels),
        shown[0],
        shown[-1],
        gif_kb,
        ", ".join(pictures),
        names[row],
    )
    log.info("logged them under figures/ in MLflow run %s", run["run_id"])


if __name__ == "__main__":
    run_stage(main)
