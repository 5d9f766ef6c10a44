"""Shared fixtures: a temporary git copy of this repository on a tiny config.

End-to-end tests run the real `dvc` and `python -m stages.*` there, with the
MLflow store in the copy (DVC_ROOT makes it the copy's mlflow.db).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from devtools.repo_copy import BIN, REPO, clean_env, copy_repo, merge  # noqa: F401

TINY = {
    "data": {"count": 8, "size": 64, "val_fraction": 0.25},
    "train": {"epochs": 2, "batch_size": 2, "crop": 48},
}


# Tests that use these run the real dvc, mlflow or stages end to end: marked e2e, so
# `make test-fast` (pytest -m "not e2e") leaves them out.
E2E_FIXTURES = {"workspace", "mlflow_server"}


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


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free 127.0.0.1 port; its whole process group ends afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
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
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 60 s"
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
