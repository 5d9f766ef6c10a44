"""Refresh the README's pictures from real pipeline runs: `make docs`.

Runs the default pipeline (sobel_x) and a smiley experiment in a temporary git
copy of this repo, so the workspace, its DVC cache and its mlflow.db are left
alone, then copies the figures here, and takes screenshots of `dvc plots diff`'s page
offline (docs/plots_page.py) and of `mlflow ui` on that copy's store
(docs/mlflow_ui.py); both need Debian's chromium. Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO))

from devtools.repo_copy import clean_env, copy_repo  # noqa: E402
from docs import mlflow_ui, plots_page  # noqa: E402
from src import config, figures, kernels  # noqa: E402

FIGURES = ("convergence.gif", "comparison.png", "sample.png", "curves.png")
# filters a linear layer cannot be: they have no true kernel to draw
NON_LINEAR = ("median", "max", "min", "abs_sobel_x", "gradient_magnitude")
ORIGINAL = ["-S", "train.recipe=original", "-S", "train.max_steps=2000"]  # the seed's training
# the README's "Beyond one gray kernel" and "What one linear layer can learn": each family's
# run from the committed params (every key it needs given, so none leaks into the next)
FAMILIES = {
    "relu": ["kernel=edge", "filter.activation=relu"],
    "bank": ["kernel=[sobel_x,sobel_y,laplacian]"],
    "bank2": ["kernel=[smiley,sobel_x]"],
    "red": ["kernel=red", "data.channels=3", "filter.activation=sigmoid"],
    "median": ["kernel=median"],
    "abs_sobel_x": ["kernel=abs_sobel_x"],
    "rescale": ["kernel=sobel_x", "filter.rescale=2"],
    "noisy": ["kernel=sobel_x", "filter.noise_std=0.01"],
}


def gallery() -> None:
    """docs/kernels.png: every built-in kernel; a colour one per channel (R, G, B), and
    the non-linear filters, which have no kernel, marked as such."""
    settings = config.KernelSettings()  # the defaults of params.yaml
    shown = {}
    for name in kernels.NAMES:
        kernel = None if name in NON_LINEAR else kernels.make(name, settings)
        shown[name] = kernel if kernel is not None else no_kernel(name, settings)
    shown["gaussian cov"] = kernels.gaussian(30, covariance=[[25, 12.5], [12.5, 25]])
    figures.kernel_gallery(shown).savefig(DOCS / "kernels.png", dpi=90)


def no_kernel(name: str, settings) -> str:
    """The gallery's note for a filter with no kernel, with the size the layer learns."""
    size = getattr(getattr(settings, name, None), "size", 5 if name == "median" else 3)
    return f"non-linear:\nno kernel\n\nthe layer learns\nits best linear\n{size}×{size} kernel"


def pipeline_figures() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = copy_repo(Path(tmp), REPO, who="docs")
        env = clean_env()  # MLflow goes to the copy's own mlflow.db
        subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
        subprocess.run(["git", "commit", "-qm", "docs"], cwd=copy, check=True)
        steps = {}
        for kernel in ("sobel_x", "smiley"):
            subprocess.run(
                ["dvc", "exp", "run", "-n", kernel, "-S", f"kernel={kernel}"],
                cwd=copy,
                env=env,
                check=True,
            )
            (DOCS / kernel).mkdir(parents=True, exist_ok=True)
            for name in FIGURES:
                shutil.copy2(copy / "figures" / name, DOCS / kernel / name)
            steps[kernel] = pd.read_csv(copy / "metrics/steps.csv")
        # the README's step 5, `dvc plots diff main smiley`, drawn offline
        subprocess.run(["dvc", "plots", "diff", "main", "smiley"], cwd=copy, env=env, check=True)
        plots_page.capture(copy / "dvc_plots/index.html", DOCS / "plots.png")
        subprocess.run(
            ["dvc", "exp", "run", "-S", "kernel=smiley", *ORIGINAL], cwd=copy, env=env, check=True
        )
        recipes(
            {
                "train.recipe fast (K-FAC SGD, batch 16)": steps["smiley"],
                "train.recipe original (Adam 1e-3, batch 1)": pd.read_csv(
                    copy / "metrics/steps.csv"
                ),
            }
        ).savefig(DOCS / "recipes.png", dpi=figures.DPI)
        for name, settings in FAMILIES.items():
            subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=copy, check=True)
            sets = [arg for setting in settings for arg in ("-S", setting)]
            subprocess.run(["dvc", "exp", "run", "-n", name, *sets], cwd=copy, env=env, check=True)
            (DOCS / name).mkdir(parents=True, exist_ok=True)
            for figure in FIGURES:
                shutil.copy2(copy / "figures" / figure, DOCS / name / figure)
            shutil.copy2(copy / "metrics/train.json", DOCS / name / "train.json")
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=copy, check=True)
        mlflow_ui.capture(copy, DOCS / "mlflow")


def recipes(curves: dict[str, pd.DataFrame]) -> Figure:
    """kernel_rel_error per optimizer step of the smiley, one line per recipe."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, steps in curves.items():
        ax.plot(steps.step, steps.kernel_rel_error, marker=".", label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (step 0: the random initial kernel)")
    ax.set_ylabel("kernel_rel_error")
    ax.set_title("smiley on the default data: the same layer, two recipes")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return fig


if __name__ == "__main__":
    gallery()
    pipeline_figures()
    print(f"refreshed {DOCS.relative_to(REPO)}/")
