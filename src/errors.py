"""User-caused errors, and the entry-point wrapper that turns them into one line.

A UserError is something the user can fix (a param, a path, the network). The
wrapper prints `error: <message>` on stderr with no traceback and exits 2; any
other exception is a bug and keeps its traceback.

The line also says how to get back what the failed run changed: DVC deletes a stage's
outputs before running it, and a failed `dvc exp run -S` leaves its value in params.yaml,
where `git status` may not show it (DVC rewrites the file at the same size in the same
second, and git trusts its stat cache).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from src import interrupts, lifeline, paths

# Back to the committed params and outputs (README, "Back to the defaults"). `touch` makes
# git compare the bytes: after a failed `dvc exp run -S` its stat cache says "unchanged".
BACK_TO_COMMITTED = (
    "touch -c params.yaml dvc.lock metrics/* && "
    "git checkout HEAD -- params.yaml dvc.lock metrics && dvc checkout"
)


class UserError(Exception):
    """A problem the user caused and can fix; the message says both."""


def _params_changed() -> bool:
    """Whether params.yaml's bytes differ from the last commit's (False outside git)."""
    try:
        committed = subprocess.run(
            ["git", "show", "HEAD:params.yaml"], capture_output=True, check=True, timeout=10
        ).stdout
        return Path("params.yaml").read_bytes() != committed
    except (OSError, subprocess.SubprocessError):
        return False


def way_back() -> str:
    """What to add to a failed stage's error line so the user can undo the run: nothing in
    a queued or --temp experiment's copy (the workspace is untouched) or outside DVC."""
    stage = os.environ.get("DVC_STAGE")
    if stage is None or Path.cwd().resolve() != paths.repo_root():
        return ""
    if _params_changed():
        return (
            "; params.yaml differs from the last commit (`git status` may not show it): "
            f"back to the committed params and outputs with `{BACK_TO_COMMITTED}`"
        )
    return f"; `dvc checkout {stage}` brings back its outputs of the last run"


def _exit_now() -> None:
    """End the process once its work is written: flush, then skip the interpreter's
    teardown. TensorFlow's takes ~2.7 s of a stage that is otherwise done (its outputs
    are closed and renamed into place by then; MLflow's run is ended)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_stage(main: Callable[[], None], exit_fast: bool = False) -> None:
    """Run a stage's main() with logging set up and user errors made one line. SIGTERM,
    and the death of the dvc that runs the stage (src/lifeline.py), unwind like Ctrl-C.
    `exit_fast`: a stage that imported TensorFlow ends without its slow teardown."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    lifeline.start()
    try:
        with interrupts.sigterm_as_interrupt():
            main()
        if exit_fast:
            _exit_now()
    except UserError as exc:
        print(f"error: {exc}{way_back()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        gone = lifeline.gone()
        why = f"{gone}, which ran this stage, exited, so it stopped" if gone else "interrupted"
        print(
            f"error: {why}; nothing partial was kept, rerun to continue{way_back()}",
            file=sys.stderr,
        )
        sys.exit(130)
