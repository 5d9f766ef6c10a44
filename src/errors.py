"""User-caused errors, and the entry-point wrapper that turns them into one line.

A UserError is something the user can fix (a param, a path, the network). The
wrapper prints `error: <message>` on stderr with no traceback and exits 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user caused and can fix; the message says both."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main() with logging set up and user errors made one line."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was kept, rerun to continue", file=sys.stderr)
        sys.exit(130)
