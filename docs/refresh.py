"""Refresh the README's pictures from real pipeline runs: `make docs`.

Runs the default pipeline (sobel_x) and a smiley experiment in a temporary git
copy of this repo, so the workspace, its DVC cache and its mlflow.db are left
alone, then copies the figures here, and takes screenshots of `mlflow ui` on that
copy's store (docs/mlflow_ui.py; needs Debian's chromium). Takes a few minutes on
2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))

from devtools.repo_copy import clean_env, copy_repo  # noqa: E402
from docs import mlflow_ui  # noqa: E402
from src import config, figures, kernels  # noqa: E402

FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")


def gallery() -> None:
    settings = config.KernelSettings()  # the defaults of params.yaml
    shown = {name: kernels.make(name, settings) for name in kernels.NAMES}
    shown["gaussian cov"] = kernels.gaussian(30, covariance=[[25, 12.5], [12.5, 25]])
    figures.kernel_gallery(shown).savefig(DOCS / "kernels.png", dpi=90)


def pipeline_figures() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_repo(Path(tmp), REPO, who="docs")
        env = clean_env()  # MLflow goes to the copy's own mlflow.db
        subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
        subprocess.run(["git", "commit", "-qm", "docs"], cwd=copy, check=True)
        for kernel in ("sobel_x", "smiley"):
            subprocess.run(
                ["dvc", "exp", "run", "-S", f"kernel={kernel}"], cwd=copy, env=env, check=True
            )
            (DOCS / kernel).mkdir(parents=True, exist_ok=True)
            for name in FIGURES:
                shutil.copy2(copy / "figures" / name, DOCS / kernel / name)
        mlflow_ui.capture(copy, DOCS / "mlflow")


if __name__ == "__main__":
    gallery()
    pipeline_figures()
    print(f"refreshed {DOCS.relative_to(REPO)}/")
