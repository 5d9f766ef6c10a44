"""src/interrupts.py when the stage was started with SIGINT ignored (a background job of
a non-interactive shell): real signals, sent to this process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from src.interrupts import sigterm_as_interrupt, uninterrupted


@pytest.fixture
def sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored_after_a_store_write(sigint_ignored):
    """Held back during the write, then re-sent to the ignore that was there before:
    whoever started the stage with SIGINT ignored meant it, and Python honours it too."""
    with uninterrupted():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    time.sleep(0.1)  # a KeyboardInterrupt, or the default action, would have come by now
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_still_interrupts_when_sigint_is_ignored(sigint_ignored):
    """So `kill`, `timeout` or a CI runner's cancel still marks the run KILLED."""
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
