"""Train stage: a single linear conv layer learns the kernel until converged; every epoch,
and the kernel at log-spaced steps, goes to MLflow.

Reads data/gray and data/filtered (only the rows each batch needs, src/stack.py),
writes model/ (the learned kernel and bias, its snapshots, the Keras model, the MLflow
run id), metrics/train.json (with converged and steps), the per-epoch
metrics/history.csv and the per-snapshot metrics/steps.csv.
"""

from src import console

if __name__ == "__main__":  # run as a stage, not imported by a test
    console.hide_tensorflow_logs()  # before TensorFlow is imported

import logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src import config, figures, kernels, layers, paths, stage_files, tracking, training  # noqa: E402
from src.atomic import atomic_dir  # noqa: E402
from src.errors import run_stage  # noqa: E402

log = logging.getLogger("train")


class LogToMlflow(keras.callbacks.Callback):
    """Each epoch's metrics at step = epoch (step 0: the initial kernel's error), and the
    kernel snapshots taken since the last epoch, picture and error, at step = optimizer
    step: the image slider and the per-step error curve move from the first step."""

    def __init__(self, run_id, model_id, snapshots, true_kernel, value_range, names):
        super().__init__()
        self.run_id, self.model_id, self.snapshots = run_id, model_id, snapshots
        self.true_kernel, self.value_range, self.names = true_kernel, value_range, names

    def _log_snapshots(self):
        taken = [(step, kernel) for step, _, kernel in self.snapshots.taken()]
        tracking.log_snapshots(self.run_id, taken, self.true_kernel, self.value_range, self.names)

    def on_train_begin(self, logs=None):
        rate = float(np.asarray(self.model.optimizer.learning_rate))
        start = {"steps": 0, "elapsed_s": 0.0, "learning_rate": rate}  # step 0: before training
        if self.true_kernel is not None:
            learned = layers.learned_kernel(self.model)
            start |= tracking.kernel_errors(learned, self.true_kernel, self.names)
        tracking.log_epoch(self.run_id, 0, start)
        self._log_snapshots()

    def on_epoch_end(self, epoch, logs=None):
        last = self.model.stop_training or epoch + 1 == self.params["epochs"]
        tracking.log_epoch(self.run_id, epoch + 1, logs, self.model_id if last else None)
        self._log_snapshots()

    def on_train_end(self, logs=None):
        self._log_snapshots()  # the final step's, when it came after the last epoch's end


def steps_table(snapshots: training.KernelSnapshots, true_kernel: np.ndarray) -> pd.DataFrame:
    """metrics/steps.csv: each snapshot's step, epoch and error against the true kernel."""
    errors = [kernels.errors(k, true_kernel) for k in snapshots.kernels]
    return pd.DataFrame(
        {
            "step": snapshots.steps,
            "epoch": snapshots.epochs,
            "kernel_mse": [mse for mse, _ in errors],
            "kernel_rel_error": [rel for _, rel in errors],
        }
    )


def not_converged_hint(cfg: config.TrainConfig, newton_step: float) -> str:
    """The warning of a run that reached train.max_steps unconverged: what to change."""
    advice = "raise train.max_steps"
    if cfg.recipe == "original":
        advice += " (the original recipe is slow by design; train.recipe fast converges)"
    elif cfg.precondition == "none":
        advice += " or set train.precondition kfac"
    return (
        f"warning: not converged: stopped at train.max_steps={cfg.max_steps} with the kernel "
        f"still {newton_step:.1e} (relative) from its optimum, above train.tolerance="
        f"{cfg.tolerance:g}; {advice}"
    )


def main() -> None:
    params = config.load()
    stage_files.require_inputs("train")
    true_kernel = stage_files.read_true_kernel()
    index = stage_files.read_index()
    info = stage_files.read_filter_info()
    split = index["split"].to_numpy()
    with (
        tracking.training_run(params) as run_id,  # before the data: a bad store fails at once
        stage_files.open_gray_images() as images,
        stage_files.open_targets() as targets,
    ):
        tracking.log_datasets(params, index, run_id)
        names = getattr(info, "names", None) or [params.kernel]  # one per filter
        model_id = tracking.start_model(run_id, params, names)
        value_range = figures.symmetric_range(true_kernel)
        snapshots = training.KernelSnapshots(params.train.max_steps)
        logger = LogToMlflow(run_id, model_id, snapshots, true_kernel, value_range, names)
        model, fit = training.train(
            images,
            targets,
            true_kernel,
            split,
            info.padding,  # as the targets were made
            params.train,
            params.seed,
            callbacks=[snapshots, logger],
        )
        history = pd.DataFrame(fit.history).assign(epoch=np.array(fit.epoch) + 1)
        last = history.iloc[-1]
        converged = bool(last.converged)

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
                    "model_uri": f"models:/{model_id}",  # mlflow.pyfunc.load_model(...)
                },
            )
        stage_files.write_history(history.drop(columns=["converged"]))
        stage_files.write_steps(steps_table(snapshots, true_kernel))
        metrics = {
            "converged": converged,
            "steps": int(last.steps),
            "epochs": int(last.epoch),
            "kernel_mse": last.kernel_mse,
            "kernel_rel_error": last.kernel_rel_error,
            "newton_step": last.newton_step,
            "loss": last.loss,
            "train_seconds": round(last.elapsed_s, 2),
        }
        if "val_loss" in history:  # absent with no held-out images: left out, not NaN
            metrics["val_loss"] = last.val_loss
        stage_files.write_train_metrics(metrics)
        tracking.log_outcome(run_id, metrics, model_id)
        tracking.log_final(
            run_id,
            true_kernel=true_kernel,
            learned_kernel=snapshots.kernels[-1],
            value_range=value_range,
            names=names,
        )
        description = tracking.model_description(model, names, metrics)
        tracking.log_model(model, model_id, step=int(last.epoch), description=description)
        log.info(
            "kernel_rel_error %.3e after %d steps (%d epoch%s) in %.1f s, %s",
            last.kernel_rel_error,
            last.steps,
            last.epoch,
            "" if last.epoch == 1 else "s",
            last.elapsed_s,
            "converged" if converged else "not converged",
        )
        if not converged:
            log.warning(not_converged_hint(params.train.effective(), last.newton_step))
    tracking.register_model(model_id, params, metrics)  # after the run has ended FINISHED


if __name__ == "__main__":
    run_stage(main)
