"""Stage filter: images → targets, the images filtered with the true kernel bank.

Reads data/gray/images.npy (N, S, S, C) float32; writes data/filtered/:
  targets.npy  (N, S', S', F) float32, what the model learns to output: the activation
               of the correlation with each of the F kernels, plus the noise
  kernel.npy   (kh, kw, C, F), the exact kernel a Conv2D must learn (flipped for
               convolve); the single source of truth for later stages. Not written for a
               non-linear filter (median, max, min, abs_sobel_x, gradient_magnitude)
  filter.json  names, shape, channels, activation, rescale, operation, padding, noise_std
  inputs.npy   with filter.rescale > 1 only: the images reduced to data.size, the
               layer's inputs (data/gray then holds them at rescale× the size)
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from src import config, filtering, kernels, paths, stack, stage_files, streams
from src.atomic import atomic_dir
from src.errors import UserError, run_stage

log = logging.getLogger("filter")


def target_filter(params: config.Params) -> tuple[filtering.Filter, np.ndarray | None]:
    """The Filter that params describe, and the float32 Conv2D kernel it applies (None for
    a non-linear filter). Targets come from the float32 kernel that is saved, so
    kernel.npy gives them back as is."""
    settings = params.filter
    if not params.linear:
        (name,) = params.kernel_names
        shape = kernels.shape(name, params.kernels)
        made = filtering.Filter(
            settings.padding,
            nonlinear_filter=filtering.nonlinear(name, params.kernels),
            shape=shape,
            rescale=settings.rescale,
        )
        return made, None
    kernel = filtering.conv2d_kernel(params.true_kernel(), settings.operation).astype(np.float32)
    made = filtering.Filter(
        settings.padding,
        conv_kernel=kernel,
        activation=settings.activation,
        rescale=settings.rescale,
    )
    return made, kernel


def main() -> None:
    params = config.load()
    settings, rescale = params.filter, params.filter.rescale
    stage_files.require_inputs("filter")
    images, _ = stage_files.open_gray_images_with_index()
    with images:
        if len(images.shape) != 4:
            raise UserError(
                f"{paths.GRAY_IMAGES} is (N, H, W), from an earlier version; rerun "
                "`dvc repro -f grayscale`"
            )
        n, height, width, channels = images.shape
        size = params.data.size
        if (height, width, channels) != (size * rescale, size * rescale, params.data.channels):
            raise UserError(
                f"{paths.GRAY_IMAGES} holds {height}×{width}×{channels} images, but data.size "
                f"{size}, filter.rescale {rescale} and data.channels {params.data.channels} "
                f"need {size * rescale}×{size * rescale}×{params.data.channels}; "
                "rerun `dvc repro grayscale`"
            )
        made, kernel = target_filter(params)
        out_h, out_w = made.target_shape(size, size)
        rng = streams.rng(params.seed, streams.TARGET_NOISE)

        start = time.perf_counter()
        with atomic_dir(paths.FILTERED) as tmp:
            pairs = filtering.make_pairs(images, made, noise_std=settings.noise_std, rng=rng)
            with contextlib.ExitStack() as files:
                shape = (out_h, out_w, made.filters)
                targets = files.enter_context(stack.StackWriter(tmp / paths.TARGETS.name, n, shape))
                # with rescale > 1 the layer's inputs are the fine images reduced, like the targets
                inputs = None
                if rescale > 1:
                    where, shape = tmp / paths.INPUTS.name, (size, size, channels)
                    inputs = files.enter_context(stack.StackWriter(where, n, shape))
                for image, target in pairs:
                    targets.append(target)
                    if inputs is not None:
                        inputs.append(image)
            stage_files.write_filter_outputs(
                tmp,
                kernel,
                stage_files.FilterInfo(
                    kernel=params.kernel_label,
                    names=tuple(params.filter_names),
                    shape=made.shape,
                    channels=channels,
                    filters=made.filters,
                    activation=settings.activation,
                    linear=params.linear,
                    rescale=rescale,
                    operation=settings.operation,
                    padding=settings.padding,
                    noise_std=settings.noise_std,
                    images=n,
                    target_shape=(out_h, out_w),
                ),
            )
    log.info(
        "%d images %d×%d×%d → targets %d×%d×%d with %s %d×%d (%s, %s padding, %s, rescale %d, "
        "noise %g) in %.1f s",
        n,
        size,
        size,
        channels,
        out_h,
        out_w,
        made.filters,
        params.kernel_label,
        *made.shape,
        settings.operation if params.linear else "non-linear",
        settings.padding,
        settings.activation,
        rescale,
        settings.noise_std,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    run_stage(main)
