"""The fit: the K-FAC estimate, the stopping rule's check images, Keras's fit, and the
final exact step."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from src import streams
from src.config import TrainConfig
from src.errors import UserError
from src.layers import build_model, choose_conv
from src.normal_equations import Solution, four, spread
from src.training.batches import WHITENERS, crops, epoch_steps, training_dataset
from src.training.callbacks import EpochEnd
from src.training.curvature import Preconditioner, top_curvature
from src.training.devices import distribution
from src.training.optimizer import optimizer
from src.training.step import Learner
from src.training.stopping import NewtonStep, check_images

log = logging.getLogger("train")

VAL_MAX_IMAGES = 128  # per-epoch val_loss uses at most this many held-out images
BIAS_IMAGES = 16  # training images the bias (and the training loss) is measured on
PROBE_BATCHES = 4  # plain SGD: the step is sized for the steepest of the first batches
PRECONDITION_CROPS = 64  # crops the K-FAC estimate is made on: the same for any data size
CHECK_SIDE = 512  # the stopping rule's images are cut to this side: memory flat in data.size
CONDITION_MAX = 1e12  # a patch covariance worse conditioned than this does not determine k
EQUATIONS_PER_UNKNOWN = 2  # fewer training target pixels a weight: tagged not identifiable


@dataclass
class Result:
    model: keras.Model  # in the filter's padding, with its biases, ready to predict
    history: list[dict]  # one dict of metrics per epoch
    stop_reason: str  # optimum | noise floor | closed form | max_steps
    steps: int
    final: dict  # the final model's metrics (after the final exact step, if any)
    closed_form: Solution | None
    final_exact_step: bool = False
    identifiable: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        """Stopped by the rule, on data that determine the kernel: a kernel the training
        images leave open (identifiable false) is not called converged, however it stopped."""
        return self.stop_reason != "max_steps" and self.identifiable


def check_equations(train_rows, target_shape, kernel_shape, channels) -> tuple[int, int]:
    """(equations, unknowns) of one filter; too few equations is a one-line error."""
    kh, kw = kernel_shape
    equations = len(train_rows) * int(np.prod(target_shape))
    unknowns = kh * kw * channels + 1
    if equations < unknowns:
        raise UserError(
            f"too few equations to learn the kernel: {len(train_rows)} training image(s) give "
            f"{equations} target pixels for the {unknowns} weights of a {kh}×{kw}×{channels} "
            "kernel and its bias; raise data.size or data.limit, or lower data.val_fraction"
        )
    return equations, unknowns


def train(
    images,
    targets,
    true_kernel: np.ndarray | None,
    split: np.ndarray,
    padding: str,
    cfg: TrainConfig,
    seed: int,
    *,
    kernel_shape: tuple[int, int],
    names: Sequence[str] = ("kernel",),
    activation: str = "linear",
    solver: str = "sgd",
    closed_form: Callable[[np.ndarray | None], Solution | None] = lambda start: None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    snapshots=None,
) -> Result:
    """Fit the layer until the stopping rule (EpochEnd) or train.max_steps, then, at the
    noise floor, take the final exact step to the closed form. `closed_form()` gives the
    least-squares filter on the training images (or None: with an activation);
    solver lstsq takes it as the result without training.

    `images` (N, S, S, C) and `targets` (N, S', S', F) are arrays or stacks; `split` holds
    'train' or 'val' per row. `cfg` is applied with its recipe (TrainConfig.effective).
    """
    cfg = cfg.effective()
    linear = activation == "linear"
    if not linear and cfg.whiten != "none":
        cfg = cfg.model_copy(update={"whiten": "none"})  # whitening does not commute with it
    keras.utils.set_random_seed(seed)
    strategy = distribution(cfg)
    shares = strategy.num_replicas_in_sync
    kernel_shape = tuple(int(n) for n in kernel_shape)
    channels = four(images[:1]).shape[-1]
    filters = four(targets[:1]).shape[-1]
    conv = choose_conv(kernel_shape, cfg.conv)
    train_rows = np.flatnonzero(split == "train")
    val_rows = np.flatnonzero(split == "val")[:VAL_MAX_IMAGES]
    if len(train_rows) == 0:
        raise UserError("no training images: data.val_fraction leaves none; lower it or add images")
    if shares > len(train_rows):
        raise UserError(
            f"train.devices is {shares}, but there are only {len(train_rows)} training images: "
            "every device needs one a step; lower train.devices or add images"
        )
    equations, unknowns = check_equations(train_rows, targets.shape[1:3], kernel_shape, channels)
    final = build_model(kernel_shape, conv, padding, True, channels, filters, activation)
    bias_rows = spread(train_rows, BIAS_IMAGES)
    names = list(names)

    def on_epoch_for(newton_step=None):
        return EpochEnd(
            final,
            true_kernel,
            names,
            images,
            targets,
            bias_rows,
            val_rows,
            cfg,
            newton_step,
            linear,
            floor_rule=False,
        )

    if solver == "lstsq":
        solution = closed_form(None)
        final.get_layer("conv").set_weights(
            [solution.kernel.astype(np.float32), solution.bias.astype(np.float32)]
        )
        metrics: dict = {"steps": 0, "epoch": 1}
        on_epoch_for().measure(metrics)
        metrics.update(
            crop_loss=metrics["loss"],
            newton_step=0.0,  # the closed form is the optimum itself
            kernel_change=0.0,
            elapsed_s=solution.seconds,
        )
        return Result(
            final,
            [metrics],
            "closed form",
            0,
            metrics,
            solution,
            True,
            *_identify(solution, equations, unknowns),
        )

    scale = 1.0
    rng = streams.rng(seed, streams.CROPS)
    side = cfg.crop_side(images.shape[1])
    inverse = None
    kfac = cfg.precondition == "kfac" and cfg.optimizer == "sgd"
    if kfac:
        sample = next(
            crops(
                images,
                targets,
                np.sort(train_rows),
                kernel_shape,
                padding,
                PRECONDITION_CROPS,
                min(images.shape[1], CHECK_SIDE),  # whole images, up to 512²: long lags
                streams.rng(seed, streams.CURVATURE),
                1,
            )
        )[0]
        try:
            preconditioner = Preconditioner(np.asarray(WHITENERS[cfg.whiten](sample)), kernel_shape)
        except ValueError:
            raise _no_contrast(cfg) from None
        inverse = preconditioner.inverse
    else:
        # plain steps: the data are scaled for unit curvature on the steepest first batch
        probe = crops(
            images,
            targets,
            train_rows,
            kernel_shape,
            padding,
            cfg.batch_size,
            side,
            streams.rng(seed, streams.CROPS),
            shares,
        )
        batches = [x for x, _ in itertools.islice(probe, PROBE_BATCHES)]
        curvature = max(
            top_curvature(np.asarray(WHITENERS[cfg.whiten](x)), kernel_shape, seed) for x in batches
        )
        if not curvature > 0:
            raise _no_contrast(cfg)
        scale = 1.0 / math.sqrt(curvature)
        inverse_for_check = None
    del rng
    check_x, check_t = check_images(
        images, targets, train_rows, kernel_shape, padding, cfg, scale, activation
    )
    check_x, check_t = (
        check_x[:, :CHECK_SIDE, :CHECK_SIDE],
        check_t[:, : CHECK_SIDE - kernel_shape[0] + 1, : CHECK_SIDE - kernel_shape[1] + 1],
    )
    if inverse is None:
        inverse_for_check = Preconditioner(check_x, kernel_shape).inverse
    else:
        inverse_for_check = inverse / scale**2
    newton_step = NewtonStep(check_x, check_t, inverse_for_check, activation)
    # the noise floor: for linear layers, whose final exact step is the closed form; an
    # activation's local minimum (a dead ReLU) would look like one, so it runs to the optimum
    floor_rule = kfac and linear
    read_errors: list[UserError] = []
    dataset = training_dataset(
        images, targets, train_rows, kernel_shape, padding, cfg, seed, scale, read_errors, shares
    )
    steps = epoch_steps(len(train_rows), cfg, shares)
    epochs = -(-cfg.max_steps // steps)
    log.info(
        "conv %s, %d channel(s) → %d filter(s)%s, whiten %s, step %s, %d train / %d val "
        "images, %d steps per epoch (at most %d)",
        conv,
        channels,
        filters,
        "" if linear else f" then {activation}",
        cfg.whiten,
        ("K-FAC, sized on each batch" if linear or not newton_step.exact else "Gauss–Newton")
        if kfac
        else f"{cfg.optimizer} (no preconditioning)",
        len(train_rows),
        len(val_rows),
        steps,
        cfg.max_steps,
    )
    if shares > 1:
        log.info(
            "training on %d devices (%s) with tf.distribute.MirroredStrategy, "
            "%d images of each batch per device",
            shares,
            ", ".join(strategy.extended.worker_devices),
            cfg.batch_size // shares,
        )
    with strategy.scope():  # the variables live on every device, mirrored
        net = build_model(kernel_shape, conv, "valid", not linear, channels, filters, activation)
        model = Learner(net.layers, inverse, activation, cfg.learning_rate, name=net.name)
        model.build((None, None, None, channels))
        if not linear:  # the same random start as the final model's layer, bias zero
            pass
        model.compile(optimizer=optimizer(cfg, inverse))
    on_epoch = on_epoch_for(newton_step)
    on_epoch.floor_rule = floor_rule
    history: list[dict] = []
    recorder = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: history.append({**logs, "epoch": epoch + 1})
    )
    own = [snapshots] if snapshots is not None else []
    try:
        model.fit(
            dataset,
            epochs=epochs,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
            callbacks=[*own, on_epoch, recorder, *callbacks],
        )
    except tf.errors.OpError:
        if read_errors:
            raise read_errors[0] from None
        raise
    stop_reason = on_epoch.stop_reason or "max_steps"
    # warm-started from the learned kernel: the iterative solve then takes a few passes
    solution = closed_form(final.get_layer("conv").get_weights()[0]) if linear else None
    final_metrics = dict(on_epoch.last)
    exact_step = False
    if stop_reason == "noise floor" and solution is not None:
        # the last step is exact: the least-squares filter of all training images, where
        # the noise floor says the batches' steps have nothing left to find
        final.get_layer("conv").set_weights(
            [solution.kernel.astype(np.float32), solution.bias.astype(np.float32)]
        )
        on_epoch.measure(final_metrics)
        exact_step = True
        log.info(
            "noise floor: the final exact step to the least-squares filter of all training images"
        )
    identifiable, notes = _identify(solution, equations, unknowns)
    return Result(
        final,
        history,
        stop_reason,
        on_epoch.steps,
        final_metrics,
        solution,
        exact_step,
        identifiable,
        notes,
    )


def _identify(solution: Solution | None, equations: int, unknowns: int) -> tuple[bool, list[str]]:
    notes = []
    if equations < EQUATIONS_PER_UNKNOWN * unknowns:
        notes.append(
            f"only {equations} training target pixels for {unknowns} weights: the kernel is "
            "barely determined; raise data.size or data.limit"
        )
    if solution is not None and solution.method == "cg" and not solution.converged:
        notes.append(
            f"the closed form's conjugate gradients stopped after {solution.iterations} "
            "iterations short of their tolerance: its numbers are approximate"
        )
    if (
        solution is not None
        and solution.condition is not None
        and solution.condition > CONDITION_MAX
    ):
        notes.append(
            f"the training patches' covariance has condition number {solution.condition:.1e}: "
            "the images do not determine every weight; use photos with more texture"
        )
    return not notes, notes


def _no_contrast(cfg: TrainConfig) -> UserError:
    return UserError(
        "the training images have no contrast to learn from: the training crops are all "
        f"zero after whitening (train.whiten={cfg.whiten}), as flat single-colour photos "
        "are; use photos with edges and texture in data.source"
    )
