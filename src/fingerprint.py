"""Content fingerprints of the inputs that params.yaml names: a data.source folder or .zip,
and the kernel.

dvc.yaml can only depend on fixed paths, and data.source and kernel are often not paths at
all (synthetic, sobel_x). So the fingerprint stage runs on every `dvc repro` and writes
what they hold into two small files that download and filter depend on: those re-run
exactly when the content changed. The fingerprints hold no absolute paths, so a queued
experiment's copy of the repo fingerprints the same inputs the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from src import paths
from src.config import Params

SOURCE = Path("data/fingerprints/source.json")  # download depends on it
KERNEL = Path("data/fingerprints/kernel.json")  # filter depends on it
GENERATED = ("synthetic", "mit_scenes")  # made from params and code, which DVC already tracks


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source(data_source: str) -> dict:
    """What data.source holds, found as the download stage finds it: a folder's every file
    (names and bytes, hidden ones too, so nothing download might read is missed), or a
    file's bytes."""
    if data_source in GENERATED:
        return {"source": data_source}
    path = paths.source_path(data_source)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
            digest.update(_file_sha256(path / name).encode() + b"\n")
        return {"source": data_source, "files": len(names), "sha256": digest.hexdigest()}
    if path.is_file():
        return {"source": data_source, "sha256": _file_sha256(path)}
    return {"source": data_source, "missing": True}  # the download stage says what is wrong


def kernel(params: Params) -> dict:
    """The kernel's values as the filter stage reads them, so a `file:` kernel whose
    contents change is seen, and a built-in one never changes."""
    values = np.ascontiguousarray(params.true_kernel(), dtype=np.float64)
    return {
        "kernel": params.kernel,
        "shape": list(values.shape),
        "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
    }
