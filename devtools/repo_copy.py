"""A temporary git copy of this repository, for the tests, `make bench` and `make docs`.

Each of them runs the real pipeline (`dvc repro`, `dvc exp run`, the stages) in a
copy, so the workspace, its DVC cache and its mlflow.db are never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """A user's shell: the venv first on PATH, no inherited DVC or MLflow variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DVC_", "MLFLOW_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def merge(doc: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict):
            merge(doc.setdefault(key, {}), value)
        else:
            doc[key] = value
    return doc


def copy_repo(root: Path, source: Path = REPO, who: str = "bench") -> Path:
    """Copy the repo's files (tracked, and untracked but not ignored) into `root`, as a
    fresh git repo with `who` as its committer. The tests and `make docs` use it too."""
    root = Path(root)
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, names.split("\0")):
        if (source / name).is_file():  # a deleted, not yet committed file is listed too
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, root / name)
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", f"{who}@example.invalid"],
        ["config", "user.name", who],
    ):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root
