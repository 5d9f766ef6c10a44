"""Train stage: a single linear conv layer learns the kernel; every epoch goes to MLflow.

Reads data/gray and data/filtered (only the rows each batch needs, src/stack.py),
writes model/ (the learned kernel, its per-epoch history, the Keras model, the
MLflow run id), metrics/train.json and the per-epoch metrics/history.csv.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402

from src import config, paths, stack, tracking, training  # noqa: E402
from src.atomic import atomic_dir, atomic_file, write_json  # noqa: E402
from src.errors import UserError, run_stage  # noqa: E402

log = logging.getLogger("train")
HISTORY_FIELDS = ("epoch", "loss", "val_loss", "kernel_mse", "kernel_rel_error", "elapsed_s")


def read_split() -> np.ndarray:
    with open(paths.GRAY_INDEX, newline="") as handle:
        return np.array([row["split"] for row in csv.DictReader(handle)])


def main() -> None:
    params = config.load()
    for needed in (paths.GRAY_IMAGES, paths.GRAY_INDEX, paths.TARGETS, paths.KERNEL):
        if not needed.exists():
            raise UserError(f"{needed} is missing; run the earlier stages with `dvc repro`")
    with (tracking.training_run(params) as run_id,  # before the data: a bad store fails at once
          stack.open_gray_images() as images, stack.open_targets() as targets):
        true_kernel = np.load(paths.KERNEL, allow_pickle=False).astype(np.float64)
        value_range = tracking.symmetric_range(true_kernel)
        history: list[training.EpochResult] = []

        def report(result: training.EpochResult) -> None:
            history.append(result)
            metrics = {name: getattr(result, name) for name in HISTORY_FIELDS[1:]}
            tracking.log_epoch(run_id, result.epoch, metrics, result.kernel, value_range)

        model = training.train(images, targets, true_kernel, read_split(), params.filter.padding,
                               params.train, params.seed, report)

        with atomic_dir(paths.MODEL) as out:
            np.save(out / paths.LEARNED_KERNEL.name, training.learned_kernel(model))
            np.save(out / paths.KERNEL_HISTORY.name, np.stack([r.kernel for r in history]))
            model.save(out / paths.MODEL_FILE.name)
            write_json(out / paths.RUN_INFO.name, {
                "run_id": run_id, "tracking_uri": paths.tracking_uri(),
                "experiment": params.mlflow_experiment})
        with atomic_file(paths.HISTORY) as handle:
            writer = csv.writer(handle)
            writer.writerow(HISTORY_FIELDS)
            for r in history:
                writer.writerow([r.epoch]
                                + [f"{getattr(r, name):.6g}" for name in HISTORY_FIELDS[1:]])
        last = history[-1]
        write_json(paths.TRAIN_METRICS, {
            "kernel_mse": last.kernel_mse, "kernel_rel_error": last.kernel_rel_error,
            "val_loss": last.val_loss, "loss": last.loss, "epochs": last.epoch,
            "train_seconds": round(last.elapsed_s, 2)})
        tracking.log_final(run_id, true_kernel=true_kernel, learned_kernel=history[-1].kernel,
                           model_path=paths.MODEL_FILE, value_range=value_range)
        log.info("kernel_rel_error %.3e after %d epochs in %.1f s", last.kernel_rel_error,
                 last.epoch, last.elapsed_s)


if __name__ == "__main__":
    run_stage(main)
