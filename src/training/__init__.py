"""A single linear convolution layer learns the kernel from (grayscale, target) pairs.

The model is the original experiment's: one Conv2D filter of the kernel's size
with a bias, no activation, trained with a mean-squared-error loss. Four things
make it fast and exact on 2 CPU cores:

- conv: a 32×32 Conv2D is slow on a CPU, so large kernels use FFTConv2D, the
  same linear map computed with FFTs (same weights, outputs and gradients).
- whiten: natural images have a ~1/f² power spectrum, which makes the loss badly
  conditioned. We filter input and target with the same derivative filters;
  filters commute, so the optimum is unchanged, and the spectrum becomes ~flat.
- scale: whitened input and target are multiplied by one constant chosen so that
  the loss's largest curvature in the kernel is 1 (measured on a few batches
  before training). The optimum is unchanged, and the same learning_rate is
  stable for any whitening, kernel size and image contrast.
- bias: whitening removes constants, so the bias has nothing to fit in whitened
  space (and its curvature, 2 at any scale, would make the step unstable). SGD
  trains the kernel; after each epoch the bias is set to its least-squares value
  for that kernel, the mean residual on training images in the original space.

One job a module:

    batches     crops with their targets, whitening, the tf.data pipeline, epoch length
    curvature   the Hessian in the kernel: exact, Toeplitz, Lanczos; K-FAC's inverse
    stopping    the Newton step, the stopping rule's measure, and its check images
    optimizer   SGD (K-FAC-preconditioned) or Adam
    devices     train.devices as a tf.distribute strategy
    callbacks   after each epoch (stop, bias, metrics), and the kernel snapshots
    loop        train(): the set-up and Keras's fit
"""

from src.training.batches import WHITENERS, crops, epoch_steps, training_dataset, whiten_pair
from src.training.callbacks import (
    ANNEALED,
    MAX_SNAPSHOTS,
    PLATEAU,
    PLATEAU_FACTOR,
    EpochEnd,
    KernelSnapshots,
    residual_moments,
    snapshot_steps,
)
from src.training.curvature import (
    EXACT_HESSIAN_MAX_TAPS,
    Preconditioner,
    exact_normal_equations,
    patch_autocorrelation,
    patch_products,
    top_curvature,
)
from src.training.devices import distribution, visible_devices
from src.training.loop import train
from src.training.optimizer import PreconditionedSGD, optimizer
from src.training.stopping import CHECK_IMAGES, NewtonStep, check_images

__all__ = [
    "ANNEALED",
    "CHECK_IMAGES",
    "EXACT_HESSIAN_MAX_TAPS",
    "MAX_SNAPSHOTS",
    "PLATEAU",
    "PLATEAU_FACTOR",
    "WHITENERS",
    "EpochEnd",
    "KernelSnapshots",
    "NewtonStep",
    "PreconditionedSGD",
    "Preconditioner",
    "check_images",
    "crops",
    "distribution",
    "epoch_steps",
    "exact_normal_equations",
    "optimizer",
    "patch_autocorrelation",
    "patch_products",
    "residual_moments",
    "snapshot_steps",
    "top_curvature",
    "train",
    "training_dataset",
    "visible_devices",
    "whiten_pair",
]
