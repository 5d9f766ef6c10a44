"""Train stage: a single linear conv layer learns the kernel; every epoch goes to MLflow.

Reads data/gray and data/filtered (only the rows each batch needs, src/stack.py),
writes model/ (the learned kernel and bias, its per-epoch history, the Keras model,
the MLflow run id), metrics/train.json, the per-epoch metrics/history.csv and
metrics/steps.csv (for now one row per epoch).
"""

from src import console

if __name__ == "__main__":  # run as a stage, not imported by a test
    console.hide_tensorflow_logs()  # before TensorFlow is imported

import logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src import config, figures, layers, paths, stage_files, tracking, training  # noqa: E402
from src.atomic import atomic_dir  # noqa: E402
from src.errors import run_stage  # noqa: E402

log = logging.getLogger("train")

EXAMPLE_MARGIN = 16  # the input example is the kernel's size plus this many pixels a side


class LogEpochToMlflow(keras.callbacks.Callback):
    """Each epoch's metrics at step = epoch, and a picture of the kernel at up to
    tracking.MAX_PICTURES log-spaced epochs; at step 0 the initial kernel and its error,
    so the image card never opens empty."""

    def __init__(self, run_id, model_id, true_kernel, value_range: tuple[float, float]):
        super().__init__()
        self.run_id, self.model_id = run_id, model_id
        self.true_kernel, self.value_range = true_kernel, value_range

    def on_train_begin(self, logs=None):
        kernel = layers.learned_kernel(self.model)
        mse, rel = training.kernel_errors(kernel, self.true_kernel)
        metrics = {"kernel_mse": mse, "kernel_rel_error": rel}
        tracking.log_epoch(self.run_id, 0, metrics, kernel, self.value_range)

    def on_epoch_end(self, epoch, logs=None):
        last = self.params["epochs"]
        shown = epoch + 1 in tracking.picture_steps(last)
        model_id = self.model_id if epoch + 1 == last else None  # the final metrics
        kernel = layers.learned_kernel(self.model)
        tracking.log_epoch(self.run_id, epoch + 1, logs, kernel, self.value_range, shown, model_id)


def example_input(images, split: np.ndarray, kernel_shape: tuple[int, int]) -> np.ndarray:
    """A small corner of the first held-out image, (1, side, side, 1), for the MLflow model:
    big enough for a 'valid' output, small enough to keep as JSON."""
    rows = np.flatnonzero(split == "val")
    row = int(rows[0]) if len(rows) else 0
    side = min(images.shape[1], max(kernel_shape) + EXAMPLE_MARGIN)
    return images[row, :side, :side][None, :, :, None]


def main() -> None:
    params = config.load()
    stage_files.require_inputs("train")
    true_kernel = stage_files.read_true_kernel()
    index = stage_files.read_index()
    split = index["split"].to_numpy()
    with (
        tracking.training_run(params) as run_id,  # before the data: a bad store fails at once
        stage_files.open_gray_images() as images,
        stage_files.open_targets() as targets,
    ):
        tracking.log_datasets(params, index, run_id)
        model_id = tracking.start_model(run_id)
        value_range = figures.symmetric_range(true_kernel)
        snapshots = training.KernelSnapshots()
        model, fit = training.train(
            images,
            targets,
            true_kernel,
            split,
            stage_files.read_filter_info().padding,  # as the targets were made
            params.train,
            params.seed,
            callbacks=[snapshots, LogEpochToMlflow(run_id, model_id, true_kernel, value_range)],
        )
        history = pd.DataFrame(fit.history).assign(epoch=np.array(fit.epoch) + 1)
        # STOPGAP until the trainer snapshots the kernel at log-spaced steps: one
        # snapshot per epoch, at the epoch's last step; no step-0 snapshot yet
        steps = history[["epoch", "kernel_mse", "kernel_rel_error"]].assign(
            step=history.epoch * fit.params["steps"]
        )

        with atomic_dir(paths.MODEL) as out:
            stage_files.write_model(
                out,
                learned_kernel=layers.learned_kernel(model),
                bias=float(model.get_layer("conv").get_weights()[1][0]),
                kernel_history=snapshots.stacked,
                model=model,
                run={
                    "run_id": run_id,
                    "tracking_uri": paths.tracking_uri(),
                    "experiment": params.mlflow.experiment,
                },
            )
        stage_files.write_history(history)
        stage_files.write_steps(steps)
        last = history.iloc[-1]
        metrics = {
            "kernel_mse": last.kernel_mse,
            "kernel_rel_error": last.kernel_rel_error,
            "loss": last.loss,
            "epochs": int(last.epoch),
            "train_seconds": round(last.elapsed_s, 2),
        }
        if "val_loss" in history:  # absent with no held-out images: left out, not NaN
            metrics["val_loss"] = last.val_loss
        stage_files.write_train_metrics(metrics)
        tracking.log_final(
            run_id,
            true_kernel=true_kernel,
            learned_kernel=snapshots.kernels[-1],
            value_range=value_range,
        )
        example = example_input(images, split, true_kernel.shape)
        tracking.log_model(model, example, model_id, params, float(last.kernel_rel_error))
        log.info(
            "kernel_rel_error %.3e after %d epochs in %.1f s",
            last.kernel_rel_error,
            last.epoch,
            last.elapsed_s,
        )


if __name__ == "__main__":
    run_stage(main)
