"""The errors a user can fix: a wrong flag, a missing or corrupt input file, an output folder in the way, a
run that diverged. The entry scripts print them as one `error: ...` line and exit non-zero (no traceback);
anything else is an internal error and keeps its traceback. Set OFT_DEBUG=1 for tracebacks of both."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the message names, with the file or flag and the fix."""


class UsageError(UserError, ValueError):
    """A flag, a flag combination or a setting that cannot work."""


class InputFileError(UserError, FileNotFoundError):
    """A file or folder the user passed is missing, corrupt, or not what the flag needs."""


class OutputWriteError(UserError, OSError):
    """The output folder cannot take what a run writes (a full disk, a quota, no permission)."""


EXIT_USER_ERROR = 2  # argparse's code for a usage mistake


def run_cli(main: Callable[[], object]) -> None:
    """Call an entry point's `main`; a `UserError` becomes one `error:` line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        if os.environ.get("OFT_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
