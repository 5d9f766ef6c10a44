"""Train stage: one conv layer learns the kernel (a bank of them, on gray or colour
images, with an activation after it) until the stopping rule; every epoch, and the kernel
at log-spaced steps, goes to MLflow. The closed-form least-squares filter of the same
training images is computed next to it, as the reference every run is measured against.

Reads data/gray and data/filtered (only the rows each batch needs, src/stack.py),
writes model/ (the learned kernel and biases, its snapshots, the Keras model, the closed
form, the MLflow run id), metrics/train.json (with converged and stop_reason), the
per-epoch metrics/history.csv and the per-snapshot metrics/steps.csv.
"""

from src import console

if __name__ == "__main__":  # run as a stage, not imported by a test
    console.hide_tensorflow_logs()  # before TensorFlow is imported

import logging  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src import config, normal_equations, paths, stage_files  # noqa: E402
from src.atomic import atomic_dir  # noqa: E402
from src.errors import run_stage  # noqa: E402

log = logging.getLogger("train")


def steps_table(snapshots, true_kernel, names) -> pd.DataFrame:
    """metrics/steps.csv: each snapshot's step, epoch and error against the true kernel."""
    from src.training import kernel_errors

    table = pd.DataFrame({"step": snapshots.steps, "epoch": snapshots.epochs})
    if true_kernel is not None:
        errors = pd.DataFrame([kernel_errors(k, true_kernel, names) for k in snapshots.kernels])
        table = pd.concat([table, errors], axis=1)
    return table


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
    info = stage_files.read_filter_info()
    names, activation = list(info.names), info.activation
    true_kernel = stage_files.read_true_kernel()  # (kh, kw, C, F), None without one
    kernel_shape = tuple(info.shape)
    index = stage_files.read_index()
    split = index["split"].to_numpy()
    train_rows = np.flatnonzero(split == "train")
    val_rows = np.flatnonzero(split == "val")
    with (
        stage_files.open_inputs() as images,
        stage_files.open_targets() as targets,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        closed: Future | None = None
        if activation == "linear" and len(train_rows):
            # NumPy, mostly outside the GIL (BLAS, FFTs): solved while TensorFlow imports,
            # which holds one core at most
            closed = pool.submit(
                normal_equations.least_squares,
                images,
                targets,
                train_rows,
                kernel_shape,
                info.padding,
            )

        def closed_form(start):
            return closed.result() if closed is not None else None

        import keras  # noqa: F401  (the 3-5 s import, while the closed form is solved)

        from src import figures, layers, tracking, training

        with tracking.training_run(params) as run_id:
            tracking.log_datasets(params, index, run_id)
            model_id = tracking.start_model(run_id, params, names)
            # one fixed colour range per filter, from the true kernel, else the closed form
            reference = true_kernel
            if reference is None and closed is not None:
                reference = closed.result().kernel
            value_range = figures.kernel_ranges(reference)
            snapshots = training.KernelSnapshots(params.train.max_steps)
            logger = _mlflow_logger(
                keras, tracking, run_id, model_id, snapshots, true_kernel, value_range, names
            )
            result = training.train(
                images,
                targets,
                true_kernel,
                split,
                info.padding,  # as the targets were made
                params.train,
                params.seed,
                kernel_shape=kernel_shape,
                names=names,
                activation=activation,
                solver=params.train.solver,
                closed_form=closed_form,
                callbacks=[logger],
                snapshots=snapshots,
            )
            model = result.model
            final_kernel = layers.learned_kernel(model)
            if result.final_exact_step or result.stop_reason == "closed form":
                snapshots.add(result.steps, len(result.history), final_kernel)
            history = pd.DataFrame(result.history)
            solution = result.closed_form
            lstsq = None
            metrics = {
                "converged": result.converged,
                "stop_reason": result.stop_reason,
                "identifiable": result.identifiable,
                "final_exact_step": result.final_exact_step,
                "steps": int(result.steps),
                "epochs": len(result.history),
            }
            final = result.final
            for key in ("kernel_mse", "kernel_rel_error"):
                if key in final:
                    metrics[key] = final[key]
            metrics.update({k: v for k, v in final.items() if k.startswith("kernel_rel_error/")})
            for key in ("newton_step", "loss", "val_loss", "explained_variance"):
                if key in final:
                    metrics[key] = final[key]
            if solution is not None:
                rows = val_rows if len(val_rows) else train_rows
                val_loss, r2 = normal_equations.residuals(
                    images, targets, rows[:128], solution.kernel, solution.bias, info.padding
                )
                lstsq = {
                    "kernel": solution.kernel,
                    "bias": solution.bias.tolist(),
                    "val_loss": val_loss,
                    "explained_variance": r2,
                    "seconds": round(solution.seconds, 3),
                    "method": solution.method,
                }
                metrics.update(lstsq_val_loss=val_loss, lstsq_explained_variance=r2)
                if true_kernel is not None:
                    errors = training.kernel_errors(solution.kernel, true_kernel, names)
                    metrics.update(
                        lstsq_kernel_mse=errors["kernel_mse"],
                        lstsq_kernel_rel_error=errors["kernel_rel_error"],
                    )
                metrics["lstsq_seconds"] = round(solution.seconds, 3)
            metrics["train_seconds"] = round(float(final.get("elapsed_s", 0.0)), 2)

            with atomic_dir(paths.MODEL) as out:
                stage_files.write_model(
                    out,
                    learned_kernel=final_kernel,
                    bias=layers.learned_bias(model),
                    kernel_history=snapshots.stacked,
                    model=model,
                    run={
                        "run_id": run_id,
                        "tracking_uri": paths.tracking_uri(),
                        "experiment": params.mlflow.experiment,
                        "model_uri": f"models:/{model_id}",  # mlflow.pyfunc.load_model(...)
                        # a local folder: visualize copies its figures there without MLflow
                        "artifact_uri": tracking.artifact_uri(run_id),
                    },
                    lstsq=lstsq,
                )
            stage_files.write_history(history)
            stage_files.write_steps(steps_table(snapshots, true_kernel, names))
            stage_files.write_train_metrics(metrics)
            tracking.log_outcome(run_id, metrics, model_id)
            tracking.log_final(
                run_id,
                true_kernel=true_kernel,
                learned_kernel=final_kernel,
                value_range=value_range,
                names=names,
            )
            description = tracking.model_description(model, names, metrics)
            tracking.log_model(model, model_id, step=metrics["epochs"], description=description)
            for note in result.notes:
                log.warning("warning: %s", note)
            error = metrics.get("kernel_rel_error")
            log.info(
                "%s after %d steps (%d epoch%s) in %.1f s, %s (%s)%s",
                f"kernel_rel_error {error:.3e}"
                if error is not None
                else f"explained_variance {metrics.get('explained_variance', float('nan')):.6f}",
                result.steps,
                metrics["epochs"],
                "" if metrics["epochs"] == 1 else "s",
                metrics["train_seconds"],
                "converged" if result.converged else "not converged",
                result.stop_reason,
                f"; closed form {metrics['lstsq_kernel_rel_error']:.3e} in {solution.seconds:.1f} s"
                if "lstsq_kernel_rel_error" in metrics
                else "",
            )
            if not result.converged:
                log.warning(
                    not_converged_hint(
                        params.train.effective(), float(final.get("newton_step", 1.0))
                    )
                )
        tracking.register_model(model_id, params, metrics)  # after the run has ended FINISHED


def _mlflow_logger(keras, tracking, run_id, model_id, snapshots, true_kernel, value_range, names):
    """Each epoch's metrics at step = epoch (step 0: the initial kernel's error), and the
    kernel snapshots taken since the last epoch, picture and error, at step = optimizer
    step: the image slider and the per-step error curve move from the first step."""
    from src import layers

    class LogToMlflow(keras.callbacks.Callback):
        def _log_snapshots(self):
            taken = [(step, kernel) for step, _, kernel in snapshots.taken()]
            tracking.log_snapshots(run_id, taken, true_kernel, value_range, names)

        def on_train_begin(self, logs=None):
            start = {"steps": 0, "elapsed_s": 0.0}  # step 0: before training
            if true_kernel is not None:
                learned = layers.learned_kernel(self.model)
                start |= tracking.kernel_errors(learned, true_kernel, names)
            tracking.log_epoch(run_id, 0, start)
            self._log_snapshots()

        def on_epoch_end(self, epoch, logs=None):
            last = self.model.stop_training or epoch + 1 == self.params["epochs"]
            metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            tracking.log_epoch(run_id, epoch + 1, metrics, model_id if last else None)
            self._log_snapshots()

        def on_train_end(self, logs=None):
            self._log_snapshots()  # the final step's, when it came after the last epoch's end

    return LogToMlflow()


if __name__ == "__main__":
    run_stage(main, exit_fast=True) if "exit_fast" in run_stage.__code__.co_varnames else run_stage(
        main
    )
