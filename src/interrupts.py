"""Ctrl-C and SIGTERM around MLflow store writes.

A stage is stopped by Ctrl-C (SIGINT, also what `dvc queue kill` sends, to the
queue worker's whole process group: the worker, `dvc exp exec-run` and the stage)
or by SIGTERM (`kill`, `timeout`, a container stop). Both must unwind the stage
like an exception, so its MLflow run is marked KILLED, and neither may land in
the middle of a store write, which would leave SQLite locked.

A SIGINT ignored when the stage starts (a background job of a non-interactive
shell) stays ignored, as Python leaves it: whoever started the stage chose that.
SIGTERM still stops it, and `dvc queue kill` still reaches it: the queue's celery
worker handles SIGINT, so the processes it starts get the default back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread.

    So `kill`, `timeout` or a container stop unwinds like Ctrl-C (SIGINT, which
    is also what `dvc queue kill` sends) and the MLflow run is marked KILLED.
    A second SIGTERM acts as before. SIGKILL (`dvc queue kill --force`) can't be
    caught. Outside the main thread signals can't be handled: this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed from C: restoring it is not possible, default is closest
        previous = signal.SIG_DFL

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM until the block's store writes are done.

    An interrupt raised inside a SQLite write leaves its transaction open (MLflow
    rolls back only on Exception), and the lock it holds makes every later write,
    marking the run KILLED included, fail with `database is locked`. Writes take
    milliseconds, so the signal is delivered again right after, to whatever
    handler was there. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in caught}
    for signum in caught:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])
