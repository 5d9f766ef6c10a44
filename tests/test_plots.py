"""The page of `dvc plots show` / `dvc plots diff` (dvc.yaml's plots, .dvc/plots/): it draws
offline, with the errors on log axes, one panel per column.

The browser tests open the page DVC writes in a real headless Chromium (Debian's, driven by
Playwright), with every request that is not for a file or 127.0.0.1 refused, and read the
curves from the SVG that Vega drew. In CI (.ci/run sets LLF_REQUIRE_CHROMIUM) a missing
Chromium fails them; elsewhere they are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, clean_env

from devtools import vega_page
from docs import plots_page
from src import stage_files

TEMPLATES = REPO / ".dvc/plots"
STEP_VIEW, EPOCH_VIEW = "kernel error per optimizer step", "losses and errors per epoch"


@pytest.fixture
def chromium() -> None:
    if not Path(plots_page.CHROMIUM).exists():
        reason = f"no Chromium at {plots_page.CHROMIUM}: `apt-get install chromium`"
        if os.environ.get("LLF_REQUIRE_CHROMIUM"):
            pytest.fail(f"{reason} (LLF_REQUIRE_CHROMIUM is set, as in CI)")
        pytest.skip(reason)


def data_plots() -> dict[str, dict]:
    """dvc.yaml's plots drawn with a template, by plot id."""
    plots = (
        next(iter(p.items())) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    )
    return {name: props for name, props in plots if "template" in props}


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))


def test_the_page_holds_the_pinned_builds_and_dvc_render_keeps_them_whole():
    html = vega_page.PAGE.read_text(encoding="utf-8")
    builds = vega_page.inline_builds(html)
    assert {name: vega_page.sha256(build) for name, build in builds.items()} == {
        name: digest for name, (*_, digest) in vega_page.LIBRARIES.items()
    }
    assert html == vega_page.page(builds)  # as devtools/vega_page.py writes it
    assert not re.search(r"<script[^>]*\bsrc=", html)
    # dvc_render fills a template by str.replace of {scripts}, {plot_divs} and {refresh_tag}:
    # the JavaScript's braces survive, and with no {scripts} the CDN's tags are dropped
    from dvc_render.html import HTML
    from dvc_render.vega import VegaRenderer

    div = '<div id="plot">spec</div>'
    filled = HTML(html, refresh_seconds=5).with_scripts(VegaRenderer.SCRIPTS).with_element(div)
    page = filled.embed()
    assert vega_page.inline_builds(page) == builds
    assert div in page and '<meta http-equiv="refresh" content="5">' in page
    assert "cdn.jsdelivr" not in page and "{plot_divs}" not in page
    # each library and each package compiled into it has its licence file
    notes = (vega_page.LICENSES / "README.md").read_text()
    listed = re.findall(r"^- (\S+) \S+ \(.+\), in \S+: (\S+)$", notes, re.M)
    assert set(vega_page.LIBRARIES) <= {package for package, _ in listed}
    for _, name in listed:
        assert "copyright" in (vega_page.LICENSES / name).read_text().lower(), name


def test_each_plot_names_columns_that_its_file_always_has():
    required = {
        "metrics/history.csv": set(stage_files.HISTORY_COLUMNS)
        - stage_files.OPTIONAL_HISTORY_COLUMNS,
        "metrics/steps.csv": set(stage_files.STEPS_COLUMNS),
    }
    written = {
        "metrics/history.csv": set(stage_files.HISTORY_COLUMNS),
        "metrics/steps.csv": set(stage_files.STEPS_COLUMNS + stage_files.STEPS_ERROR_COLUMNS),
    }
    assert set(data_plots()) == {STEP_VIEW, EPOCH_VIEW}
    for props in data_plots().values():
        [(file, y)] = props["y"].items()
        # DVC refuses a revision whose file lacks the x or y column, so both are required
        assert {props["x"], y} <= required[file]
        spec = template(props["template"])
        fold = spec["transform"][0]["fold"]
        assert spec["facet"]["sort"] == fold and fold[0] == "kernel_rel_error"
        fixed = [c for c in fold if not c.endswith("/*")]
        assert set(fixed) <= written[file]
        assert [c[:-2] for c in fold if c.endswith("/*")] == ["kernel_rel_error"]
        assert spec["spec"]["encoding"]["y"]["scale"]["type"] == "log"
    x_scale = template("errors_by_step")["spec"]["encoding"]["x"]["scale"]
    assert x_scale["type"] == "symlog"  # log-spaced steps from step 0


def drawn(index_html: Path) -> dict[str, dict]:
    """The views of a dvc plots page in Chromium offline, by title; nothing refused or failed."""
    with plots_page.offline_page(index_html) as (page, traffic):
        assert traffic == plots_page.Traffic(), traffic
        return {view["title"]: view for view in plots_page.views(page)}


def curves(view: dict) -> dict[str, int]:
    return {panel: drawn["curves"] for panel, drawn in view["panels"].items()}


def expected_curves(tables: dict[str, pd.DataFrame], columns: list[str]) -> dict[str, int]:
    """Per column to draw, in panel order, how many revisions have a value > 0 in it."""
    found = {c: 0 for c in columns}
    for table in tables.values():
        for column in columns:
            values = pd.to_numeric(table.get(column, pd.Series(dtype=float)), errors="coerce")
            found[column] += bool((values > 0).any())
    return {column: n for column, n in found.items() if n}


def decay(n: int, start: float, rate: float) -> np.ndarray:
    return start * rate ** np.arange(n)


def bank_tables() -> dict[str, pd.DataFrame]:
    """metrics/ of a bank [sobel_x, median, file:edges.npy] with no held-out images, in the
    spec's columns: median has no true kernel, so no kernel_rel_error/median; val_loss and
    explained_variance are empty cells."""
    e, steps = 3, [0, 1, 2, 4, 8, 16, 24]
    history = pd.DataFrame(
        {
            "epoch": np.arange(1, e + 1), "steps": [8, 16, 24], "crop_loss": decay(e, 0.5, 0.1),
            "loss": decay(e, 0.3, 0.01), "val_loss": "", "explained_variance": "",
            "kernel_mse": decay(e, 1e-2, 1e-4), "kernel_rel_error": decay(e, 1e-3, 1e-4),
            "newton_step": decay(e, 1e-2, 1e-3), "standard_error": "", "kernel_change": 0.1,
            "elapsed_s": [0.5, 0.9, 1.3],
            "kernel_rel_error/sobel_x": decay(e, 1e-3, 1e-5), "kernel_mse/sobel_x": 1e-6,
            "kernel_rel_error/edges": decay(e, 2e-3, 1e-3), "kernel_mse/edges": 1e-6,
            "explained_variance/sobel_x": "", "explained_variance/median": "",
            "explained_variance/edges": "",
        }
    )  # fmt: skip
    n = len(steps)
    snapshots = pd.DataFrame(
        {
            "step": steps, "epoch": [0, 1, 1, 1, 1, 2, 3], "kernel_mse": decay(n, 1.0, 0.05),
            "kernel_rel_error": decay(n, 0.9, 0.05),
            "kernel_rel_error/sobel_x": decay(n, 0.8, 0.03), "kernel_mse/sobel_x": 0.1,
            "kernel_rel_error/edges": decay(n, 0.7, 0.1), "kernel_mse/edges": 0.1,
        }
    )  # fmt: skip
    return {"metrics/history.csv": history, "metrics/steps.csv": snapshots}


def no_true_kernel_tables() -> dict[str, pd.DataFrame]:
    """metrics/ of one non-linear filter (median): the kernel error columns are absent, as
    the train stage writes them (spec: absent, not NaN), and standard_error is an empty cell."""
    history = (
        bank_tables()["metrics/history.csv"]
        .iloc[:, :12]
        .assign(val_loss=decay(3, 0.2, 0.5))
        .drop(columns=["kernel_mse", "kernel_rel_error"])
    )
    snapshots = pd.DataFrame({"step": [0, 1, 2], "epoch": [0, 1, 1]})
    return {"metrics/history.csv": history, "metrics/steps.csv": snapshots}


def test_a_bank_and_empty_cells_are_drawn_offline_next_to_a_committed_run(tmp_path, chromium):
    # a DVC repo with this one's plots and page: `single` holds the committed metrics/ (one
    # kernel), `bank` a bank's, the workspace a filter without a true kernel
    repo = tmp_path / "repo"
    repo.mkdir()
    env = clean_env()

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q", "-b", "main")
    run("git", "config", "user.email", "tests@example.invalid")
    run("git", "config", "user.name", "tests")
    run(str(BIN / "dvc"), "init", "-q")
    shutil.copy2(REPO / ".dvc/config", repo / ".dvc/config")
    shutil.copytree(TEMPLATES, repo / ".dvc/plots")
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "metrics", repo / "metrics")
    single = {name: pd.read_csv(REPO / name) for name in bank_tables()}
    revisions = {"single": single, "bank": bank_tables(), "workspace": no_true_kernel_tables()}
    for rev, tables in revisions.items():
        for name, table in tables.items():
            table.to_csv(repo / name, index=False)
        if rev != "workspace":
            run("git", "add", "-A")
            run("git", "commit", "-qm", rev)
            run("git", "tag", rev)
    run(str(BIN / "dvc"), "plots", "diff", *revisions, "--targets", STEP_VIEW, EPOCH_VIEW)

    views = drawn(repo / "dvc_plots/index.html")
    assert set(views) == {STEP_VIEW, EPOCH_VIEW}
    for title, props in data_plots().items():
        [(file, _)] = props["y"].items()
        fold = template(props["template"])["transform"][0]["fold"]
        bank = [c for c in bank_tables()[file] if c.startswith("kernel_rel_error/")]
        columns = [c for c in fold if not c.endswith("/*")] + bank
        tables = {rev: tables[file] for rev, tables in revisions.items()}
        assert curves(views[title]) == expected_curves(tables, columns), title
        # one colour per revision with data: the workspace has no kernel error to show
        legend = ["bank", "single"] + (["workspace"] if title == EPOCH_VIEW else [])
        assert sorted(views[title]["legend"]) == legend
    assert list(views[STEP_VIEW]["panels"]) == [
        "kernel_rel_error", "kernel_rel_error/sobel_x", "kernel_rel_error/edges",
    ]  # fmt: skip
    # each curve's last value is written at its end, to 3 significant digits
    last = bank_tables()["metrics/steps.csv"]["kernel_rel_error/edges"].iloc[-1]
    [label] = views[STEP_VIEW]["panels"]["kernel_rel_error/edges"]["labels"]
    assert float(label) == pytest.approx(last, rel=5e-3)


def test_plots_diff_of_main_and_a_named_experiment_draws_both_offline(workspace, chromium):
    workspace.dvc("exp", "run", "-n", "smiley", "-S", "kernel=smiley")
    # main's figures/ is not in this copy's cache (its dvc.lock is the repo's): its curves
    # come from git, and only its pictures are missing
    workspace.dvc("plots", "diff", "main", "smiley")
    views = drawn(workspace.root / "dvc_plots/index.html")
    assert set(views) == {STEP_VIEW, EPOCH_VIEW}
    for view in views.values():
        assert view["legend"] == ["main", "smiley"]
        assert view["panels"] and all(n == 2 for n in curves(view).values()), view["panels"]
    steps = pd.read_csv(workspace.root / "metrics/steps.csv")  # smiley's, 0 to its last step
    panel = views[STEP_VIEW]["panels"]["kernel_rel_error"]
    main_steps = pd.read_csv(REPO / "metrics/steps.csv")
    assert panel["points"] == len(steps) + len(main_steps)
    labels = sorted(float(label) for label in panel["labels"])
    last = sorted([steps.kernel_rel_error.iloc[-1], main_steps.kernel_rel_error.iloc[-1]])
    assert labels == pytest.approx(last, rel=5e-3)
    assert {"0", "1", "10"} <= set(views[STEP_VIEW]["ticks"])  # the symlog axis from step 0
    pictures = sorted(p.name for p in (workspace.root / "dvc_plots/static").iterdir())
    assert pictures == [f"smiley_figures_{name}" for name in sorted(
        ["comparison.png", "convergence.gif", "curves.png", "sample.png"]
    )]  # fmt: skip
