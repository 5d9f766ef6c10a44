"""Content fingerprints of the inputs that params.yaml names: a data.source folder or .zip
(or scikit-image's photographs, for samples), and the kernel.

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

from src import kernels, paths, sources
from src.config import Params
from src.errors import UserError

SOURCE = Path("data/fingerprints/source.json")  # download depends on it
KERNEL = Path("data/fingerprints/kernel.json")  # filter depends on it
GENERATED = ("synthetic", "mit_scenes")  # made from params and code, which DVC already tracks


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files_sha256(root: Path, names: list[str]) -> str:
    """One hash of the files' names (relative to root) and bytes."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(_file_sha256(root / name).encode() + b"\n")
    return digest.hexdigest()


def source(data_source: str) -> dict:
    """What data.source holds, found as the download stage finds it: a folder's every file
    (names and bytes, hidden ones too, so nothing download might read is missed), a
    file's bytes, or for samples the bytes of the photographs it copies, so another
    scikit-image with other photos re-runs download."""
    if data_source in GENERATED:
        return {"source": data_source}
    if data_source == "samples":
        try:
            photos = sources.sample_photos()
        except UserError:
            return {"source": data_source, "missing": True}  # the download stage says why
        names = [photo.name for photo in photos]
        sha256 = _files_sha256(photos[0].parent, names)
        return {"source": data_source, "files": len(names), "sha256": sha256}
    path = paths.source_path(data_source)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        return {"source": data_source, "files": len(names), "sha256": _files_sha256(path, names)}
    if path.is_file():
        return {"source": data_source, "sha256": _file_sha256(path)}
    return {"source": data_source, "missing": True}  # the download stage says what is wrong


def kernel(params: Params) -> dict:
    """The kernel bank's values as the filter stage reads them, so a `file:` kernel whose
    contents change is seen, and a built-in one never changes. A non-linear filter has
    no values: its name and size (in params, which DVC tracks) say what it is."""
    bank = params.true_kernel()
    if bank is None:
        (name,) = params.kernel_names
        return {"kernel": name, "shape": list(kernels.shape(name, params.kernels))}
    values = np.ascontiguousarray(bank, dtype=np.float64)
    return {
        "kernel": params.kernel_label,
        "shape": list(values.shape),
        "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
    }
