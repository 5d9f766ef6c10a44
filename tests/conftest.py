"""Shared fixtures: a temporary git copy of this repository on a tiny config.

End-to-end tests run the real `dvc` and `python -m stages.*` there, with the
MLflow store in the copy (DVC_ROOT makes it the copy's mlflow.db).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {"count": 8, "size": 64, "val_fraction": 0.25},
    "train": {"epochs": 2, "batch_size": 2, "crop": 48},
}


def merge(doc: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict):
            merge(doc.setdefault(key, {}), value)
        else:
            doc[key] = value
    return doc


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: venv first, no inherited DVC/MLflow vars."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "MLFLOW_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


class Workspace:
    """A git + DVC copy of the repo in a temporary directory."""

    def __init__(self, root: Path):
        self.root = root

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), cwd=self.root, env=env or clean_env(), text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                                 f"--- stdout\n{result.stdout[-4000:]}\n"
                                 f"--- stderr\n{result.stderr[-4000:]}")
        return result

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, **kwargs)

    def set_params(self, changes: dict) -> None:
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes),
                                       sort_keys=False))

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
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    root = tmp_path / "repo"
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    ws = Workspace(root)
    ws.set_params(TINY)
    ws.run("git", "init", "-q", "-b", "main")
    ws.run("git", "config", "user.email", "tests@example.invalid")
    ws.run("git", "config", "user.name", "tests")
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
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
         "--default-artifact-root", str(tmp_path / "art")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
