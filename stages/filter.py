"""Stage filter: grayscale images → targets, the images filtered with the true kernel.

Reads data/gray/images.npy (N, S, S) float32; writes data/filtered/:
  targets.npy  (N, S', S') float32, what the model learns to output
  kernel.npy   the exact kernel a Conv2D must learn (flipped for convolve); the
               single source of truth for later stages
  filter.json  kernel name, shape, operation, padding, noise_std
"""

from __future__ import annotations

import logging
import time

import numpy as np

from src import config, filtering, paths, stack, stage_files, streams
from src.atomic import atomic_dir
from src.errors import UserError, run_stage

log = logging.getLogger("filter")


def main() -> None:
    params = config.load()
    op, padding, noise_std = params.filter.operation, params.filter.padding, params.filter.noise_std
    stage_files.require_inputs("filter")
    images, _ = stage_files.open_gray_images_with_index()
    with images:
        n, height, width = images.shape
        # Targets come from the float32 kernel that is saved, so kernel.npy gives them back as is.
        kernel = filtering.conv2d_kernel(params.true_kernel(), op).astype(np.float32)
        if kernel.shape[0] > height or kernel.shape[1] > width:
            raise UserError(
                f"kernel: {params.kernel} is {kernel.shape[0]}×{kernel.shape[1]}, "
                f"larger than the {height}×{width} grayscale images; "
                "rerun `dvc repro grayscale`"
            )
        out_h, out_w = filtering.output_shape(height, width, kernel.shape, padding)
        rng = streams.rng(params.seed, streams.TARGET_NOISE)

        start = time.perf_counter()
        with atomic_dir(paths.FILTERED) as tmp:
            targets = filtering.make_targets(images, kernel, padding, noise_std=noise_std, rng=rng)
            stack.write_stack(tmp / paths.TARGETS.name, targets, n, (out_h, out_w))
            stage_files.write_filter_outputs(
                tmp,
                kernel,
                stage_files.FilterInfo(
                    kernel=params.kernel,
                    shape=kernel.shape,
                    operation=op,
                    padding=padding,
                    noise_std=noise_std,
                    images=n,
                    target_shape=(out_h, out_w),
                ),
            )
    log.info(
        "%d images %d×%d → targets %d×%d with %s %d×%d (%s, %s padding, noise %g) in %.1f s",
        n,
        height,
        width,
        out_h,
        out_w,
        params.kernel,
        *kernel.shape,
        op,
        padding,
        noise_std,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    run_stage(main)
