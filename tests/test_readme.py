"""The README's commands, run as written on a tiny config, so it cannot drift from the code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import requests
import yaml
from conftest import REPO, clean_env, free_port
from mlflow import MlflowClient

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def commands(text: str) -> list[str]:
    """Command lines of the ```bash blocks, without comments."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_setup_is_two_commands_and_ci_runs_the_test_one():
    setup = commands(section("Setup: two commands"))
    assert setup == ["make run", "make test"]
    ci = [
        line
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    # before it, only what the tests need from the machine (Chromium); no other make target
    assert ci[-1] == "make test" and [line for line in ci if "make" in line.split()] == ci[-1:]


def test_the_walkthrough_runs_as_written(workspace):
    walkthrough = commands(section("A five-minute walkthrough"))
    assert walkthrough[0] == "source .venv/bin/activate"  # the tests already run in the venv
    assert walkthrough[-1] == "make ui"
    env = clean_env()
    for line in walkthrough[1:-1]:
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=workspace.root,
            env=env,
            text=True,
            capture_output=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if line.startswith("dvc exp show"):
            for kernel in ("smiley", "sobel_y", "prewitt_x", "laplacian"):
                assert kernel in result.stdout
            assert "kernel_rel_error" in result.stdout
    assert (workspace.root / "dvc_plots/index.html").is_file()

    # `make ui`, as written, from the root; on a free port since 5000 may be taken here, and
    # with the tests' venv as it is (-o install: the copy has no .venv of its own)
    port = free_port()
    log = workspace.root.parent / "ui.log"
    with log.open("w") as out:
        ui = subprocess.Popen(
            ["bash", "-c", f"exec make -o install ui PORT={port}"],
            cwd=workspace.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "mlflow ui did not start"
            time.sleep(1)
        experiments = requests.post(
            f"{base}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=10
        ).json()["experiments"]
        ours = next(e for e in experiments if e["name"] == "learn-linear-filter")
        found = requests.post(
            f"{base}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [ours["experiment_id"]]},
            timeout=10,
        ).json()["runs"]
        kernels = sorted(
            r["data"]["tags"][i]["value"]
            for r in found
            for i in range(len(r["data"]["tags"]))
            if r["data"]["tags"][i]["key"] == "kernel"
        )
        # repro, the smiley experiment, and the three queued ones: every run in one store
        assert kernels == sorted(["sobel_x", "smiley", "sobel_y", "prewitt_x", "laplacian"])
        # the link it prints, to those runs in the Model training view
        runs = f"{base}/#/experiments/{ours['experiment_id']}/runs?workflowType=machine_learning"
        while runs not in log.read_text():
            assert time.time() < deadline and ui.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        # light: make, the mlflow CLI and one uvicorn worker, no job runner (and, for a
        # moment, the `python -c` that printed the link)
        session = [p.cmdline() for p in psutil.process_iter() if _in_session(p, ui.pid)]
        server = [c for c in session if c[1:2] != ["-c"]]
        assert len(server) == 3 and not any("huey" in " ".join(c) for c in server), session
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)

    # The registry example, where the walkthrough leaves the workspace (the smiley of step
    # 2): it registers a sobel_x, and its setting does not stay for later runs.
    (registry,) = re.findall(r"`(dvc exp run [^`]*mlflow\.registered_model=sobel-filter)`", README)
    params = (workspace.root / "params.yaml").read_bytes()
    workspace.run("bash", "-c", registry)
    assert (workspace.root / "params.yaml").read_bytes() == params
    assert yaml.safe_load(params)["mlflow"]["registered_model"] == ""
    client = MlflowClient(workspace.tracking_uri)
    (version,) = client.search_model_versions("name = 'sobel-filter'")
    assert int(version.version) == 1 and version.tags["kernel"] == "sobel_x"
    assert client.get_run(version.run_id).data.tags["kernel"] == "sobel_x"


def test_beyond_one_gray_kernel_runs_as_written(workspace):
    """Its experiments (ReLU, two banks, the red detector), each from the one before, then
    the comparison, which shows each family's keys and a bank's per-filter errors."""
    *runs, show = commands(section("Beyond one gray kernel"))
    assert all(line.startswith("dvc exp run -n ") for line in runs)
    assert show.startswith("dvc exp show")
    env = clean_env()
    workspace.dvc("repro")
    for line in [*runs, show]:
        result = subprocess.run(
            ["bash", "-c", line],
            cwd=workspace.root,
            env=env,
            text=True,
            capture_output=True,
            timeout=900,
        )
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    header = result.stdout.splitlines()[1].split()
    for column in ("kernel", "filter.activation", "stop_reason", "kernel_rel_error/laplacian"):
        assert column in header, result.stdout
    for value in ("relu", "sigmoid", "red", "['sobel_x', 'sobel_y', 'laplacian']"):
        assert value in result.stdout, result.stdout


def _in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ProcessLookupError):
        return False


def test_every_make_target_in_the_readme_exists():
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"`make (\w+)`", README)):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_the_readme_pictures_exist():
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (REPO / path).is_file(), path
