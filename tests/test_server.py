"""`make server` (src/server.py, then `mlflow server`): a port in use, a DB that is not a
database, an unreachable or wrong PostgreSQL are each one line and a non-zero exit within
15 s. The real make, sockets and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time

import pytest
from conftest import REPO, clean_env, free_port
from mlflow.store.db.db_types import DATABASE_ENGINES

from src import server

LIMIT_S = 15  # what the issue allows a failure
SECRET = "s3cret-pw"


def make_server(tmp_path, *assignments: str) -> tuple[str, float]:
    """Run `make server` with the README's names; its error line and how long it took. A
    make still running after twice the limit (MLflow retrying, or serving) fails the test."""
    command = ["make", "-o", "install", "server", "WORKERS=1", f"ARTIFACTS={tmp_path / 'art'}"]
    started = time.monotonic()
    process = subprocess.Popen(
        [*command, *assignments],
        cwd=REPO,
        env=clean_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=2 * LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"make server still runs after {2 * LIMIT_S} s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server it started, or MLflow's retries
            os.killpg(process.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    assert process.returncode != 0, stderr[-3000:]
    assert "Traceback" not in stderr and SECRET not in stderr, stderr[-3000:]
    # make's own lines: "make: ***", or "make[1]: ***" when make runs under make (make test)
    lines = [line for line in stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0], seconds


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line, seconds = make_server(tmp_path, f"PORT={port}", f"DB=sqlite:///{tmp_path / 's.db'}")
    assert line.startswith(f"error: port {port} on 127.0.0.1 is in use") and "PORT=" in line
    assert seconds < LIMIT_S


@pytest.mark.parametrize("db", ["nonsense", "./mlruns", "oracle://db.example.com/mlflow"])
def test_a_db_that_is_not_a_database_mlflow_takes_is_one_line(tmp_path, db):
    line, seconds = make_server(tmp_path, f"PORT={free_port()}", f"DB={db}")
    assert line.startswith(f"error: DB={db}")
    assert line.endswith("use DB=postgresql://user:password@host:5432/database")
    assert seconds < LIMIT_S


@pytest.mark.parametrize("answer", ["refused", "silent"])
def test_an_unreachable_postgresql_is_one_line_within_15_s(tmp_path, answer):
    """Nothing on the port, or a host that takes the connection and never answers (a
    firewall, a hung server): MLflow itself retried either for more than a minute."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        if answer == "silent":
            silent.listen()  # the kernel completes the handshake; nobody ever replies
        else:
            silent.close()
        db = f"DB=postgresql://mlflow:{SECRET}@127.0.0.1:{port}/mlflow"
        line, seconds = make_server(tmp_path, f"PORT={free_port()}", db)
    assert line.startswith(
        f"error: can't reach the database postgresql://mlflow:***@127.0.0.1:{port}"
    )
    assert line.endswith("start it, or fix DB") and seconds < LIMIT_S


def test_a_real_postgresql_without_the_database_is_one_line(tmp_path, postgres):
    """The server answers, the database is not there. (The right one serves: test_scaling's
    servers are the README's `make server` line.)"""
    wrong = postgres.rsplit("/", 1)[0] + "/no_such_database"
    line, seconds = make_server(tmp_path, f"PORT={free_port()}", f"DB={wrong}")
    assert line.startswith("error: can't reach the database ") and "no_such_database" in line
    assert seconds < LIMIT_S


def test_the_database_kinds_are_mlflows():
    """src/server.py keeps MLflow's list without importing MLflow (seconds): the same list."""
    assert set(server.DATABASE_ENGINES) == set(DATABASE_ENGINES)
