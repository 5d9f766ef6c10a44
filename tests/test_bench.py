"""`make bench` on a tiny size (8 images of 64×64, sobel_x, 3 s budgets, DVC section skipped):
the report, JSON and markdown, is complete and well formed. Its numbers are not judged."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.bench import SECTIONS
from benchmarks.learning import Trace

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e  # runs `make bench --quick` in a temporary copy (~40 s)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "BENCHMARKS.md", out / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--quick",
            "--skip",
            "dvc",
            "--workdir",
            str(out / "work"),
            "--out-md",
            str(md),
            "--out-json",
            str(js),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (out / "work").exists(), "the workdir is removed unless --keep"
    return json.loads(js.read_text()), md.read_text()


def leaves(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_every_section_is_there_and_every_number_is_finite(quick):
    results, _ = quick
    assert set(results["sections"]) == set(SECTIONS)
    assert results["sections"]["dvc"] == {"skipped": True}
    for path, value in leaves(results):
        assert value is None or isinstance(value, (str, bool)) or is_number(value), path
    assert is_number(results["total_s"])
    assert results["machine"]["cpus"] >= 1 and results["machine"]["versions"]["tensorflow-cpu"]


def test_sections_hold_their_measurements(quick):
    sections = quick[0]["sections"]
    stages = sections["stages"]["scales"]["8"]
    assert set(stages) == {
        "download",
        "grayscale",
        "filter:smiley",
        "filter:sobel_x",
        "train",
        "visualize",
    }
    for m in stages.values():
        assert m["seconds"] > 0 and m["peak_rss_mb"] > 0 and m["peak_anon_mb"] > 0

    ours = sections["ours"]["sobel_x"]
    assert ours["steps"] > 0 and is_number(ours["final_error"]) and ours["total_s"] > 0
    assert [r["threshold"] for r in ours["reached"]] == [1e-2, 1e-3, 1e-4]
    assert 1 <= len(ours["epochs"]) and ours["steps"] <= ours["config"]["max_steps"]

    closed = sections["closed_form"]["sobel_x"]
    assert [p["pass"] for p in closed["passes"]] == [0, 1]
    assert all(is_number(p["relative_error"]) for p in closed["passes"])

    original = sections["original"]["sobel_x"]["measured"]
    assert original["steps"] > 0 and original["stopped_by"] in ("budget", "threshold")
    assert is_number(original["step_s"])

    rows = sections["steps"]["rows"]
    assert [r["kernel"] for r in rows] == [3, 9]
    assert all(r["direct_ms"] > 0 and r["fft_ms"] > 0 for r in rows)


def test_targets_have_a_status_and_the_markdown_shows_them_all(quick):
    results, md = quick
    statuses = {report.PASS, report.FAIL, report.PROJECTED, report.NOT_APPLICABLE}
    assert results["targets"]
    for target in results["targets"]:
        assert target["status"] in statuses
        assert target["target"] in md
    for heading in (
        "## Machine",
        "## Targets",
        "## 1. ",
        "## 2. ",
        "## 3. ",
        "## 4. ",
        "## 5. ",
        "## 6. ",
    ):
        assert heading in md
    assert "nan" not in md.lower().replace("nanosecond", "") and "None" not in md
    assert results["command"] in md


def test_reached_tells_first_touch_from_staying():
    trace = Trace(__import__("numpy").ones((1, 1)))
    # error falls to 5e-3, bounces back up, then falls for good
    trace.points = [
        (0.1, 1, 1.0, 0),
        (0.2, 2, 5e-3, 0),
        (0.3, 3, 2e-2, 0),
        (0.4, 4, 1e-3, 0),
        (0.5, 5, 5e-4, 0),
    ]
    reached = trace.reached(1e-2)
    assert (reached["first_s"], reached["settled_s"]) == (0.2, 0.4)
    assert trace.reached(1e-4) == {
        "threshold": 1e-4,
        "first_s": None,
        "first_step": None,
        "settled_s": None,
        "settled_step": None,
    }
