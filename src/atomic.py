"""Write stage outputs atomically: build under a temporary sibling, then rename.

An interrupted stage never leaves a half-written output for DVC to cache; the
temporary sibling is removed on any failure, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(path, "old")
    if path.exists() or path.is_symlink():
        os.rename(path, old)
    os.rename(tmp, path)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Strict JSON: NaN or infinity raises ValueError (the caller decides what a missing
    value is), since jq and `dvc exp show` cannot read them; the old file is kept."""
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")
