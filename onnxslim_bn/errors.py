"""The one exception type for problems the user can cause and fix."""

from __future__ import annotations


class BnSlimError(Exception):
    """A user-facing error: the message names the file or node, the problem and the fix.

    The command line prints it as one line on stderr and exits non-zero, without a traceback.
    """
