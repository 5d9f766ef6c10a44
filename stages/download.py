"""Stage download: gather the images named by data.source and split them train/val.

Writes data/raw/:
  images/       the images, as found (synthetic ones as PNG)
  manifest.csv  name,split — name relative to images/; split is train or val,
                seeded by image, so which images are held out is on record
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from src import config, paths, sources, stage_files
from src.atomic import atomic_dir
from src.errors import run_stage

log = logging.getLogger("download")


def main() -> None:
    params = config.load()
    data = params.data
    start = time.perf_counter()
    with atomic_dir(paths.RAW) as tmp:
        names = sources.gather(data, params.seed, tmp / paths.RAW_IMAGES.name)
        splits = sources.split(len(names), data.val_fraction, params.seed)
        stage_files.write_manifest(tmp, names, splits)
    counts = Counter(splits)
    log.info(
        "%d images from %s → %s: %d train, %d val, in %.1f s",
        len(names),
        data.source,
        paths.RAW,
        counts["train"],
        counts["val"],
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    run_stage(main)
