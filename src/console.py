"""A quiet console: TensorFlow's C++ start-up noise is filtered out of stderr.

TensorFlow's C++ side writes straight to file descriptor 2, before and regardless
of TF_CPP_MIN_LOG_LEVEL: the absl preamble, the oneDNN and CPU-feature notices,
twice at import. A stage calls `hide_tensorflow_logs()` before it imports
TensorFlow; fd 2 then becomes a pipe into a small forked filter process that drops
exactly those lines and forwards every other byte to the real stderr, in order.

Being a separate process, the filter reads until every writer is gone, so what a
stage wrote before a segfault or abort still reaches the terminal. On a normal exit
(sys.exit and Ctrl-C included) the stage waits for the filter to finish, so nothing
arrives after the stage has exited. TF_CPP_MIN_LOG_LEVEL=0 or 1 turns the filter off.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import time


def _head(severities: bytes) -> bytes:
    """A C++ log line's head for these severities: absl's format (TF >= 2.17; before
    absl::InitializeLog its seconds count from the epoch) or TensorFlow's older own one."""
    return (
        rb"(?:[%s]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [%s] )"
        rb"\S+:\d+\] " % (severities, severities)
    )


NOISE = re.compile(
    b"|".join(
        [
            # absl's notice that nobody set it up
            rb"WARNING: All log messages before absl::InitializeLog\(\) is called"
            rb" are written to STDERR$",
            # info and warnings: TF_CPP_MIN_LOG_LEVEL=2 hides them, but not these early ones
            _head(b"IW"),
            # harmless: oneDNN falls back to Eigen for a dtype on CPUs without AVX-512
            _head(b"E") + rb"oneDNN supports DT_\w+ only on platforms with AVX-512\.",
            # cpu_feature_guard's info line goes on after a newline of its own
            rb"To enable the following instructions: .*"
            rb" rebuild TensorFlow with the appropriate compiler flags\.$",
        ]
    )
)
NOISE_STARTS = b"WITE0123456789"  # the first byte of every line NOISE matches
FINISH_TIMEOUT_S = 5.0  # a lingering grandchild that still holds the pipe can't hang the exit

_filter_pid: int | None = None


def is_noise(line: bytes) -> bool:
    """Whether one line of stderr (without its newline) is TensorFlow start-up noise."""
    return NOISE.match(line) is not None


def split_noise(pending: bytes) -> tuple[bytes, bytes]:
    """What to forward now, and the unfinished last line to hold until more arrives.

    An unfinished line is held only while it could still turn out to be noise, so a
    progress bar's `\\r` redraws and a prompt are forwarded at once.
    """
    *lines, tail = pending.split(b"\n")
    forward = b"".join(line + b"\n" for line in lines if not is_noise(line))
    if tail and tail[0] not in NOISE_STARTS:
        return forward + tail, b""
    return forward, tail


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _run_filter(source: int, sink: int) -> None:
    """Forward `source` to `sink` without the noise, until every writer has closed it."""
    held = b""
    while chunk := os.read(source, 1 << 16):
        forward, held = split_noise(held + chunk)
        try:
            _write_all(sink, forward)
        except OSError:  # the real stderr is gone: drain anyway, or the stage would block
            sink = -1  # every later write fails at once
    if held and not is_noise(held):
        try:
            _write_all(sink, held)
        except OSError:
            pass


def _same_file(fd: int, other: os.stat_result) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _finish(pid: int, owner: int, real_stderr: int, pipe: os.stat_result) -> None:
    """At exit: close our end of the pipe and wait until the filter has written it all."""
    if os.getpid() != owner:  # a forked worker exiting through atexit: not ours to wait for
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    if _same_file(2, pipe):  # unless someone (pytest's capture) has since replaced fd 2
        os.dup2(real_stderr, 2)  # what is written after this goes straight to the terminal
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.002)
    except ChildProcessError:  # already reaped (SIGCHLD ignored)
        pass


def hide_tensorflow_logs() -> None:
    """From now on, stderr passes through the noise filter. Call it before importing
    TensorFlow; a second call does nothing. Also sets TF_CPP_MIN_LOG_LEVEL=2 unless set."""
    global _filter_pid
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if _filter_pid is not None or os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1"):
        return
    read_end, write_end = os.pipe()
    # Ctrl-C reaches the whole process group: the filter must outlive the stage's last words.
    # Blocked across fork, so no signal lands before the child ignores them.
    quiet = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, quiet)
    pid = os.fork()
    if pid == 0:
        try:
            for signum in quiet:
                signal.signal(signum, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)
            os.dup2(read_end, 0)  # the terminal's input is not the filter's
            os.closerange(1, 2)  # nor may a reader of the stage's stdout wait for it
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # write_end too, or EOF never comes
            _run_filter(0, 2)
        finally:
            os._exit(0)  # no atexit handlers, no flush of buffers copied from the stage
    signal.pthread_sigmask(signal.SIG_UNBLOCK, quiet)
    os.close(read_end)
    real_stderr = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    _filter_pid = pid
    atexit.register(_finish, pid, os.getpid(), real_stderr, os.fstat(2))
