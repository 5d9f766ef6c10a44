"""A stage ends when the `dvc` that started it dies.

`timeout 22 dvc exp run` or `kill -TERM <dvc pid>` kills dvc alone: without this, the
stage went on as an orphan, finished its MLflow run, and the next `dvc repro` trained
again into a second run. DVC runs a stage's command through $SHELL -c, which may stay
between them (bash and dash exec a lone command; other shells may not), so the parent
is not always dvc: the stage watches every process from its parent up to the first one
that is not a shell. PR_SET_PDEATHSIG would cover only the parent, and fires when the
parent's *thread* ends, so a daemon thread polls instead.

When one of them is gone, the stage gets SIGTERM, which run_stage turns into
KeyboardInterrupt: it unwinds as on Ctrl-C (its MLflow run is marked KILLED, no partial
output is kept). Only stages that DVC runs (DVC_STAGE set) are watched: run by hand,
or under nohup, a stage outlives the shell that started it, as any program does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import psutil

log = logging.getLogger(__name__)

POLL_S = 0.5  # how soon a stage notices
GRACE_S = 60.0  # then SIGKILL, if the stage is stuck where SIGTERM can't reach Python
SHELLS = {"sh", "ash", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"}

_gone: str | None = None


def watched() -> list[psutil.Process]:
    """The parent, and its ancestors while they are shells, up to the first that is not
    (dvc). Init (pid 1) and pid 0 are never watched: a stage started by them has no dvc."""
    chain: list[psutil.Process] = []
    pid = os.getppid()
    while pid > 1:
        try:
            process = psutil.Process(pid)
            chain.append(process)
            if process.name() not in SHELLS:
                break
            pid = process.ppid()
        except psutil.Error:  # gone already: the watch sees that at its first look
            break
    return chain


def _alive(process: psutil.Process) -> bool:
    try:  # is_running() also tells a reused pid from the process seen at the start
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.name()} (pid {process.pid})"
    except psutil.Error:
        return f"pid {process.pid}"


def _watch(chain: list[psutil.Process], names: dict[int, str]) -> None:
    global _gone
    stop = threading.Event()
    while not stop.wait(POLL_S):
        dead = next((p for p in chain if not _alive(p)), None)
        if dead is not None:
            break
    _gone = names[dead.pid]
    log.warning("%s, which ran this stage, has exited: stopping the stage", _gone)
    os.kill(os.getpid(), signal.SIGTERM)
    if not stop.wait(GRACE_S):  # still here: stuck in a C call that never returns
        log.warning("the stage did not stop within %g s of SIGTERM: killing it", GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)


def start() -> None:
    """Watch the dvc that runs this stage, from a daemon thread (no-op unless DVC runs it)."""
    if "DVC_STAGE" not in os.environ:
        return
    chain = watched()
    if chain:
        names = {p.pid: _describe(p) for p in chain}
        threading.Thread(target=_watch, args=(chain, names), name="lifeline", daemon=True).start()


def gone() -> str | None:
    """The process whose death stopped the stage ("dvc (pid 123)"), or None."""
    return _gone
