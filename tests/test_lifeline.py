"""src/lifeline.py: a stage that DVC runs ends when the process that started it dies, also
through a shell that stays in between; real processes, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env

# A stage: run_stage around a main() that would take a minute; "ready" once it runs.
STAGE = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from src.errors import run_stage

def main():
    open("ready", "w").close()
    time.sleep(60)
    print("finished", file=sys.stderr)

run_stage(main)
"""
# What stands in for dvc: it starts the command and waits for it.
LAUNCHER = "import subprocess, sys; subprocess.Popen(sys.argv[1:]).wait()"


def start(tmp_path: Path, through_shell: bool, by_dvc: bool = True) -> subprocess.Popen:
    (tmp_path / "stage.py").write_text(STAGE)
    stage = f"{sys.executable} stage.py 2> stderr.txt"
    # `; echo` keeps the shell there (a lone command is exec'd by bash and dash)
    command = ["sh", "-c", f"{stage}; echo $? > exit.txt"] if through_shell else None
    if command is None:
        command = ["sh", "-c", f"exec {stage}"]  # the shell becomes the stage: dvc is its parent
    env = clean_env(**({"DVC_STAGE": "train"} if by_dvc else {}))
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *command], cwd=tmp_path, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "the stage never ran"
        time.sleep(0.1)
    return launcher


def end_group(launcher: subprocess.Popen) -> None:
    """SIGKILL what is left of the launcher's process group (the stage, if it lives on)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)


def stage_alive(tmp_path: Path) -> bool:
    return any(
        "stage.py" in p.read_bytes().decode(errors="replace")
        and Path(f"/proc/{p.parent.name}/cwd").resolve() == tmp_path.resolve()
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if _readable(p)
    )


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        Path(f"/proc/{path.parent.name}/cwd").resolve(strict=True)
        return True
    except OSError:
        return False


def wait_gone(tmp_path: Path, timeout: float) -> float:
    started = time.monotonic()
    while stage_alive(tmp_path):
        assert time.monotonic() - started < timeout, f"the stage still runs after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.parametrize("through_shell", [False, True], ids=["dvc parent", "shell between"])
def test_a_stage_stops_when_the_dvc_that_ran_it_dies(tmp_path, through_shell):
    launcher = start(tmp_path, through_shell)
    try:
        os.kill(launcher.pid, signal.SIGKILL)  # what `kill -9` or the OOM killer does to dvc
        launcher.wait()
        assert wait_gone(tmp_path, timeout=10) < 5
    finally:
        end_group(launcher)
    stderr = (tmp_path / "stderr.txt").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and "finished" not in stderr
    assert errors[0].startswith(f"error: python (pid {launcher.pid}), which ran this stage, ")
    assert "dvc checkout train" in errors[0]  # DVC deleted its outputs before running it
    if through_shell:  # the exit code, as the shell saw it: that of Ctrl-C
        assert (tmp_path / "exit.txt").read_text().strip() == "130"


def test_a_stage_run_by_hand_outlives_the_shell_that_started_it(tmp_path):
    """nohup and `&` keep their meaning: only a stage that DVC runs is watched."""
    launcher = start(tmp_path, through_shell=True, by_dvc=False)
    try:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        time.sleep(2)  # four times the watch's poll
        assert stage_alive(tmp_path)
    finally:
        end_group(launcher)
    wait_gone(tmp_path, timeout=10)
