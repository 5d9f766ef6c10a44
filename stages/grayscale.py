"""Stage grayscale: decode every downloaded image, take its luma (or keep its RGB, with
data.channels 3), fit it to data.size² (times filter.rescale: the fine images the
filter stage makes the targets from, then reduces).

Reads data/raw/ (manifest.csv, images/); writes
  data/gray/images.npy        (N, S, S, C) float32 in [0, 1], S = data.size × filter.rescale,
                              C = data.channels (RGB order for 3)
  data/gray/index.csv         name,split of row i of images.npy
  metrics/grayscale.json      images, train, val, skipped (and the first skipped names)
Unreadable images are skipped with a warning, up to data.max_bad_fraction of them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from src import config, grayscale, paths, stage_files
from src.atomic import atomic_dir
from src.errors import run_stage

log = logging.getLogger("grayscale")

NAMES_MAX = 20  # skipped names kept in the metrics; the count is always exact


def main() -> None:
    params = config.load()
    size = params.data.size * params.filter.rescale
    channels = params.data.channels
    rows = list(stage_files.read_manifest().itertuples(index=False, name=None))
    start = time.perf_counter()
    with atomic_dir(paths.GRAY) as tmp:
        result = grayscale.convert(
            rows,
            paths.RAW_IMAGES,
            size,
            tmp / paths.GRAY_IMAGES.name,
            params.data.max_bad_fraction,
            channels,
        )
        stage_files.write_index(tmp, *map(list, zip(*result.kept)))
    counts = Counter(split for _, split in result.kept)
    skipped = [name for name, _ in result.skipped]
    stage_files.write_grayscale_metrics(
        {
            "images": len(result.kept),
            "train": counts["train"],
            "val": counts["val"],
            "skipped": len(skipped),
            "skipped_names": skipped[:NAMES_MAX],
        }
    )
    if skipped:
        log.warning(
            "skipped %d unreadable of %d images: %s%s",
            len(skipped),
            len(rows),
            ", ".join(skipped[:NAMES_MAX]),
            " …" if len(skipped) > NAMES_MAX else "",
        )
    log.info(
        "%d images → %s (%d, %d, %d, %d) float32: %d train, %d val, in %.1f s",
        len(result.kept),
        paths.GRAY_IMAGES,
        len(result.kept),
        size,
        size,
        channels,
        counts["train"],
        counts["val"],
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    run_stage(main)
