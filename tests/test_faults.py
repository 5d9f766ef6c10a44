"""Faults, end to end: interrupting training (Ctrl-C, SIGTERM, `dvc queue kill`), a diverging
run, an unreachable server.

Each ends with one clear line, a non-zero exit, an MLflow run that is not left
RUNNING, and no partial output; a rerun of `dvc repro` then completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import BIN, ENDLESS_TRAIN, REPO, TINY, clean_env, default_sigint
from mlflow import MlflowClient

from src.errors import BACK_TO_COMMITTED

README = (REPO / "README.md").read_text()


def epochs_logged(ws) -> int:
    """kernel_mse points in the store so far (0 before it exists)."""
    db = ws.root / "mlflow.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from metrics where key='kernel_mse'").fetchone()[0]
    except sqlite3.Error:
        return 0


def statuses(ws, settle_s: float = 60) -> list[str]:
    """The runs' statuses, once none is RUNNING: Ctrl-C reaches dvc and the stage at once,
    and dvc may exit before the stage has marked its run KILLED."""
    client = MlflowClient(ws.tracking_uri)
    experiment = client.get_experiment_by_name("learn-linear-filter")
    deadline = time.time() + settle_s
    while True:
        found = sorted(r.info.status for r in client.search_runs([experiment.experiment_id]))
        if "RUNNING" not in found or time.time() > deadline:
            return found
        time.sleep(0.5)


def interrupt_training(ws, process: subprocess.Popen, signum: int, group: bool) -> str:
    deadline = time.time() + 300
    while epochs_logged(ws) < 2:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training never logged an epoch"
        time.sleep(0.2)
    (os.killpg if group else os.kill)(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    return stderr


@pytest.mark.parametrize("how", ["ctrl-c on dvc repro", "sigterm to the train stage"])
def test_interrupted_training_is_marked_killed_and_a_rerun_completes(workspace, how):
    workspace.set_params({"train": ENDLESS_TRAIN})
    env = clean_env()
    if how == "ctrl-c on dvc repro":
        process = subprocess.Popen(
            [str(BIN / "dvc"), "repro"],
            cwd=workspace.root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=default_sigint,
        )
        interrupt_training(workspace, process, signal.SIGINT, group=True)
    else:
        workspace.dvc("repro", "filter")
        process = subprocess.Popen(
            ["python", "-m", "stages.train"],
            cwd=workspace.root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=default_sigint,
        )
        stderr = interrupt_training(workspace, process, signal.SIGTERM, group=False)
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (workspace.root / "model").exists()  # nothing half-written for DVC to cache
    assert statuses(workspace) == ["KILLED"]

    workspace.set_params({"train": {**TINY["train"], "recipe": "fast"}})
    workspace.dvc("repro")
    assert statuses(workspace) == ["FINISHED", "KILLED"]
    assert (workspace.root / "model/kernel.npy").is_file()


def ignored_sigint() -> None:
    """preexec_fn: SIGINT ignored, as a non-interactive shell starts a background job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_queue_processes(ws) -> None:
    """SIGKILL the process group of every queue worker and experiment still running in
    this workspace, so a failed test leaves no training behind on the shared cores."""
    exps = ws.root / ".dvc/tmp/exps"
    for info in [*exps.glob("celery/*.json"), *exps.glob("run/*/*.json")]:
        proc = json.loads(info.read_text())
        with contextlib.suppress(OSError):  # already gone
            if (
                proc["returncode"] is None
                and Path(f"/proc/{proc['pid']}/cwd").resolve() == ws.root.resolve()
            ):
                os.killpg(os.getpgid(proc["pid"]), signal.SIGKILL)


@pytest.mark.parametrize(
    "start", [default_sigint, ignored_sigint], ids=["from a terminal", "as a background job"]
)
def test_dvc_queue_kill_stops_a_queued_training_and_marks_it_killed(workspace, start):
    """`dvc queue kill` sends SIGINT to the worker's process group (the celery worker,
    `dvc exp exec-run`, the stage). The worker re-enables SIGINT for its children, so
    the stage gets it even when `dvc queue start` was started with SIGINT ignored."""
    endless = [f"train.{key}={value}" for key, value in ENDLESS_TRAIN.items()]
    workspace.dvc("exp", "run", "--queue", "-n", "slow", *(f"-S{s}" for s in endless))
    try:
        # Not captured: the worker inherits its output, so a capture would last the whole queue.
        subprocess.run(
            [str(BIN / "dvc"), "queue", "start"],
            cwd=workspace.root,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=True,
            preexec_fn=start,
        )
        deadline = time.time() + 300
        while epochs_logged(workspace) < 2:
            assert time.time() < deadline, workspace.dvc("queue", "logs", "slow").stdout[-3000:]
            time.sleep(0.5)
        assert statuses(workspace, settle_s=0) == ["RUNNING"]

        workspace.dvc("queue", "kill", "slow")
        assert statuses(workspace) == ["KILLED"]
        deadline = time.time() + 120
        while "Running" in (status := workspace.dvc("queue", "status").stdout):
            assert time.time() < deadline, status
            time.sleep(1)
        assert "Failed" in next(line for line in status.splitlines() if " slow " in line)
        assert "error: interrupted" in workspace.dvc("queue", "logs", "slow").stdout
    finally:
        end_queue_processes(workspace)


def test_a_diverging_run_stops_with_one_line_and_is_marked_failed(workspace):
    result = workspace.dvc("exp", "run", "-S", "train.learning_rate=1e6", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "training diverged" in errors[0] and "lower train.learning_rate" in errors[0]
    assert "Traceback" not in result.stderr
    assert statuses(workspace) == ["FAILED"]
    assert not (workspace.root / "model").exists()


def test_an_unreachable_tracking_server_fails_before_training(workspace):
    workspace.dvc("repro", "filter")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    uri = f"http://127.0.0.1:{port}"
    started = time.time()
    result = workspace.run(
        "python", "-m", "stages.train", check=False, env=clean_env(MLFLOW_TRACKING_URI=uri)
    )
    assert result.returncode == 2
    assert time.time() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and uri in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (workspace.root / "model").exists()


def stage_pids(ws, name: str) -> list[int]:
    """The processes of `python -m stages.<name>` running in this workspace."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[1:] == ["-m", f"stages.{name}"] and proc.info["cwd"] == str(ws.root):
            found.append(proc.pid)
    return found


def test_a_killed_dvc_stops_its_stage_and_the_readme_gets_the_workspace_back(workspace):
    """`kill -TERM <dvc pid>` (or `timeout`) kills dvc alone: the stage used to go on as
    an orphan and finish its run, so the next `dvc repro` made a second one. DVC leaves
    git on a detached HEAD; the README's Troubleshooting says how to get back. Then, in
    the same workspace (one training, not two), a failed `-S` value and a failed stage:
    each error line says how to get back, and the README's one command does it."""
    workspace.set_params({"train": ENDLESS_TRAIN})
    workspace.commit("a training that runs until stopped")
    process = subprocess.Popen(
        [str(BIN / "dvc"), "exp", "run"],
        cwd=workspace.root,
        env=clean_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    try:
        stderr = interrupt_training(workspace, process, signal.SIGTERM, group=False)
        deadline = time.time() + 20
        while stage_pids(workspace, "train"):
            assert time.time() < deadline, "the train stage outlived dvc by 20 s"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # an orphan of a failed test
            os.killpg(process.pid, signal.SIGKILL)
    assert statuses(workspace, settle_s=5) == ["KILLED"]
    assert f"error: dvc (pid {process.pid}), which ran this stage, exited" in stderr
    assert "Traceback" not in stderr
    assert not (workspace.root / "model").exists()

    detached = workspace.run("git", "symbolic-ref", "-q", "HEAD", check=False)
    assert detached.returncode != 0, "DVC now restores the branch: update the README"
    troubleshooting = re.search(r"^## Troubleshooting\n(.*?)(?=^## )", README, re.S | re.M)[1]
    assert "`git switch main`" in troubleshooting
    workspace.run("git", "switch", "main")
    assert workspace.run("git", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/main"

    # The committed state: the data stages and what they made (the training never
    # finished, so `dvc checkout` would have no model to restore).
    for name in ("dvc.yaml", "dvc.lock"):
        doc = yaml.safe_load((workspace.root / name).read_text())
        for stage in ("train", "visualize"):
            del doc["stages"][stage]
        doc.pop("plots", None)
        (workspace.root / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    workspace.commit("the data stages")
    committed = workspace.run("git", "show", "HEAD:params.yaml").stdout
    assert f"`{BACK_TO_COMMITTED}`" in README

    # A bad -S value: 40 and -1 are the same size, so git's stat cache may hide it.
    failed = workspace.dvc("exp", "run", "-S", "train.max_steps=-1", check=False)
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: train.max_steps must be at least 1")
    assert "params.yaml differs from the last commit (`git status` may not show it): " in line
    assert line.endswith(f"`{BACK_TO_COMMITTED}`")
    workspace.run("bash", "-c", BACK_TO_COMMITTED)
    assert (workspace.root / "params.yaml").read_text() == committed
    assert workspace.run("git", "status", "--porcelain").stdout == ""

    # A failed stage: DVC deleted data/raw before running download.
    missing = workspace.root / "no-such-photos"
    failed = workspace.dvc("exp", "run", "-S", f"data.source={missing}", check=False)
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert "data.source" in line and line.endswith(f"`{BACK_TO_COMMITTED}`")
    assert not (workspace.root / "data/raw").exists()
    workspace.run("bash", "-c", BACK_TO_COMMITTED)
    assert (workspace.root / "data/raw/manifest.csv").is_file()
    assert (workspace.root / "params.yaml").read_text() == committed
    status = workspace.dvc("status", "download", "grayscale", "filter").stdout
    assert "up to date" in status, status
