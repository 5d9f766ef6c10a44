"""Shared fixtures: a temporary git copy of this repository on a tiny config.

End-to-end tests run the real `dvc` and `python -m stages.*` there, with the
MLflow store in the copy (DVC_ROOT makes it the copy's mlflow.db).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from devtools import postgres as pg
from devtools.repo_copy import BIN, REPO, clean_env, copy_repo, merge  # noqa: F401

TINY = {
    "data": {"count": 8, "size": 64, "val_fraction": 0.25},
    "train": {"max_steps": 40, "min_epoch_steps": 4, "batch_size": 2, "crop": 48},
}
# A training that runs until stopped: the original recipe (Adam 1e-3, batch 1) learns
# slowly, and its cap is far away. batch_size and crop back at the defaults it requires.
ENDLESS_TRAIN = {"recipe": "original", "max_steps": 10**6, "batch_size": 16, "crop": 128}


# Tests that use these run the real dvc, mlflow or stages end to end: marked e2e, so
# `make test-fast` (pytest -m "not e2e") leaves them out.
E2E_FIXTURES = {"workspace", "mlflow_server", "postgres"}


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


def default_sigint() -> None:
    """preexec_fn: Ctrl-C reaches the child as in a terminal. Without it, a child of a
    pytest started with SIGINT ignored (a background job of a script, some CI runners)
    inherits the ignore, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Workspace:
    """A git + DVC copy of the repo in a temporary directory."""

    def __init__(self, root: Path):
        self.root = root

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args),
            cwd=self.root,
            env=env or clean_env(),
            text=True,
            capture_output=True,
            timeout=timeout,
            preexec_fn=default_sigint,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout[-4000:]}\n"
                f"--- stderr\n{result.stderr[-4000:]}"
            )
        return result

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, **kwargs)

    def set_params(self, changes: dict) -> None:
        path = self.root / "params.yaml"
        path.write_text(
            yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes), sort_keys=False)
        )

    def commit(self, message: str = "change") -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """This repo's files (tracked, and untracked but not ignored) in a fresh git repo,
    with the tiny config committed."""
    ws = Workspace(copy_repo(tmp_path / "repo", REPO, who="tests"))
    ws.set_params(TINY)
    ws.commit("tiny config")
    return ws


def ran_stages(output: str) -> list[str]:
    """Stages that DVC actually ran (not skipped, not restored from the run cache)."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command in a session of its own: start() waits until `url`/health answers,
    stop() until every process of the session is gone, so the port is free to start again."""

    def __init__(self, command: list[str], url: str, log: Path, **popen):
        self.command, self.url, self.log, self.popen = command, url, log, popen
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> str:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.popen,
            )
        deadline = time.monotonic() + timeout
        while True:
            problem = (
                "the server exited"
                if self.proc.poll() is not None
                else f"{self.url}/health did not answer in {timeout} s"
                if time.monotonic() > deadline
                else None
            )
            if problem:
                self.stop()  # a server that never answered is not left running
                raise AssertionError(f"{problem}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self.url
            except requests.RequestException:
                time.sleep(0.3)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None:
            return
        group, self.proc = self.proc.pid, None
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _session_alive(group):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            time.sleep(0.1)


def _session_alive(group: int) -> bool:
    """Whether any process of the group is still running (zombies don't count)."""
    for pid in psutil.pids():
        try:
            process = psutil.Process(pid)
            if os.getpgid(pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError):
            pass
    return False


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free 127.0.0.1 port; its whole process group ends afterwards."""
    port = free_port()
    server = ServerProcess(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 's.db'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
        ],
        f"http://127.0.0.1:{port}",
        tmp_path / "server.log",
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        yield server.start(timeout=60)
    finally:
        server.stop()


@pytest.fixture
def postgres() -> str:
    """A fresh, empty PostgreSQL database on a free 127.0.0.1 port (devtools/postgres.py):
    the machine's PostgreSQL, or the pgserver wheel's; all of it removed afterwards."""
    with pg.running() as url:
        yield url
