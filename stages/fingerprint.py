"""Stage fingerprint: hash what data.source and the kernel hold, for DVC to compare.

Runs on every `dvc repro` (always_changed in dvc.yaml) and writes data/fingerprints/:
  source.json  the data.source folder's file names and bytes, or the .zip's bytes, or the
               bytes of scikit-image's photographs for samples, hashed
  kernel.json  the kernel's values, hashed
download depends on source.json and filter on kernel.json: a new photo or an edited
file: kernel re-runs them, and otherwise these files come out the same and nothing re-runs.
"""

from __future__ import annotations

import logging
import time

from src import config, fingerprint
from src.atomic import write_json
from src.errors import run_stage

log = logging.getLogger("fingerprint")


def main() -> None:
    params = config.load()
    start = time.perf_counter()
    source = fingerprint.source(params.data.source)
    kernel = fingerprint.kernel(params)
    write_json(fingerprint.SOURCE, source)
    write_json(fingerprint.KERNEL, kernel)
    log.info(
        "data.source %s%s, kernel %s %s, in %.1f s",
        params.data.source,
        f" ({source['files']} files)" if "files" in source else "",
        params.kernel_label,
        "×".join(map(str, kernel["shape"])),
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    run_stage(main)
