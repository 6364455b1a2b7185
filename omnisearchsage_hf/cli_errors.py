"""How the package's commands report a user's mistake: one line naming what is wrong, no traceback.

Every console command (``omnisearchsage-train``, ``-embed``, ``-index``, ``-serve``, ``-enrich``) runs its
body through ``run_command``. An error that says what to fix (a ``UsageError``, or a ``ValueError``,
``FileNotFoundError``, ``KeyError`` or ``NotADirectoryError`` raised while checking inputs) is printed as
``<prog>: error: <message>`` on stderr with exit status 2, the way argparse reports a bad flag. With
``--debug`` (or ``OMNISEARCHSAGE_DEBUG=1``) the traceback is shown instead; anything else (a bug) always
shows its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

# Errors that carry a message written for the user of the command.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


class UsageError(Exception):
    """A mistake in how a command was called (flags, folders, models), with the fix in its message."""


def wants_debug(argv: Sequence[str]) -> bool:
    """Whether ``--debug`` is among the arguments or ``OMNISEARCHSAGE_DEBUG`` is set to a true value."""
    return "--debug" in argv or os.environ.get("OMNISEARCHSAGE_DEBUG", "").lower() in ("1", "true", "yes")


def run_command(prog: str, body: Callable[[], int], argv: Sequence[str]) -> int:
    """Run ``body`` and turn a user error into one line on stderr and exit status 2."""
    try:
        return body()
    except (UsageError, *USER_ERRORS) as error:
        if wants_debug(argv):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: (run again with --debug for the traceback)", file=sys.stderr)
        return 2


__all__ = ["USER_ERRORS", "UsageError", "run_command", "wants_debug"]
