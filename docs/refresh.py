"""Refresh the README's pictures from real pipeline runs: `make docs`.

Runs the default pipeline (sobel_x) and a smiley experiment in a temporary git
copy of this repo, so the workspace, its DVC cache and its mlflow.db are left
alone, then copies the figures here. Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))

from src import figures, kernels  # noqa: E402

FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")


def gallery() -> None:
    settings = {"box": {"size": 5}, "gaussian": {"size": 7, "sigma": 1.5}}
    shown = {name: kernels.make(name, settings) for name in kernels.NAMES}
    shown["gaussian cov"] = kernels.gaussian(30, covariance=[[25, 12.5], [12.5, 25]])
    figures.kernel_gallery(shown).savefig(DOCS / "kernels.png", dpi=90)


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(args, cwd=cwd, env=env, check=True)


def pipeline_figures() -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        for name in filter(None, files.split("\0")):
            if (REPO / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, copy / name)
        for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                     ["git", "-c", "user.name=docs", "-c", "user.email=docs@example.invalid",
                      "commit", "-qm", "docs"]):
            run(args, copy)
        for kernel in ("sobel_x", "smiley"):
            run(["dvc", "exp", "run", "-S", f"kernel={kernel}"], copy)
            (DOCS / kernel).mkdir(parents=True, exist_ok=True)
            for name in FIGURES:
                shutil.copy2(copy / "figures" / name, DOCS / kernel / name)


if __name__ == "__main__":
    gallery()
    pipeline_figures()
    print(f"refreshed {DOCS.relative_to(REPO)}/")
