"""The one exception type for problems the user can cause and fix."""

from __future__ import annotations


class BnSlimError(Exception):
    """A user-facing error: the message names the file or node, the problem and the fix.

    The command line prints it as one line on stderr and exits non-zero, without a traceback.
    """


class CheckFailed(BnSlimError):
    """The onnxruntime check of the pruned model failed (a gate, or NaN/Inf where the original has none).

    ``report`` is the run's :class:`onnxslim_bn.app.report.Report` with ``verification.failed`` set, so
    that a caller (the CLI's ``--report``) can still record why; no model is written.
    """

    def __init__(self, message: str, report: object):
        super().__init__(message)
        self.report = report
