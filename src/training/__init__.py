"""A single convolution layer learns the kernel (or a bank of them, on gray or colour
images, with an activation after it) from (image, target) pairs.

The model is the original experiment's: one Conv2D of the kernel's size with a bias,
trained on the mean squared error. What makes it fast and exact on 2 CPU cores:

- conv: a 32×32 Conv2D is slow on a CPU, so large kernels use FFTConv2D, the same
  linear map computed with FFTs (same weights, outputs and gradients).
- whiten: natural images have a ~1/f² power spectrum, which makes the loss badly
  conditioned. A linear layer's input and target are filtered with the same derivative
  filters; filters commute, so the optimum is unchanged, and the spectrum becomes
  ~flat. (An activation does not commute with them: its layer trains unwhitened.)
- K-FAC: the gradient times the inverse input-patch covariance, shared by a bank's
  filters; each step's length is the exact line search on its own batch, so one steep
  batch slows only itself. Small layers with an activation take the batch's exact
  Gauss–Newton step instead.
- the stopping rule: the Newton step to the optimum of fixed check images, against its
  own standard error; at the noise floor, a final exact step to the closed form.

One job a module:

    batches     crops with their targets, whitening, the tf.data pipeline, epoch length
    curvature   the Hessian in the kernel and K-FAC's inverse
    step        the Learner: each step's direction and length (K-FAC or Gauss–Newton)
    stopping    the Newton step, its standard error, and the check images
    optimizer   what applies the step (or SGD / Adam on the plain gradient)
    devices     train.devices as a tf.distribute strategy
    callbacks   after each epoch (stop, bias, metrics), and the kernel snapshots
    loop        train(): the set-up, Keras's fit, the final exact step
"""

from src.training.batches import WHITENERS, crops, epoch_steps, training_dataset, whiten_pair
from src.training.callbacks import (
    FLOOR,
    MAX_SNAPSHOTS,
    EpochEnd,
    KernelSnapshots,
    kernel_errors,
    residual_moments,
    snapshot_steps,
)
from src.training.curvature import EXACT_HESSIAN_MAX_TAPS, Preconditioner, top_curvature
from src.training.devices import distribution, visible_devices
from src.training.loop import Result, check_equations, train
from src.training.optimizer import optimizer
from src.training.step import GAUSS_NEWTON_MAX_WEIGHTS, Learner
from src.training.stopping import CHECK_IMAGES, NewtonStep, check_images

__all__ = [
    "CHECK_IMAGES",
    "EXACT_HESSIAN_MAX_TAPS",
    "FLOOR",
    "GAUSS_NEWTON_MAX_WEIGHTS",
    "MAX_SNAPSHOTS",
    "WHITENERS",
    "EpochEnd",
    "KernelSnapshots",
    "Learner",
    "NewtonStep",
    "Preconditioner",
    "Result",
    "check_equations",
    "check_images",
    "crops",
    "distribution",
    "epoch_steps",
    "kernel_errors",
    "optimizer",
    "residual_moments",
    "snapshot_steps",
    "top_curvature",
    "train",
    "training_dataset",
    "visible_devices",
    "whiten_pair",
]
