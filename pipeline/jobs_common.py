"""What every job entry point shares: bad input ends the job with its message, not a stack trace."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from pipeline.errors import REPORTED_ERRORS

log = logging.getLogger("pipeline")


@contextmanager
def exit_on_bad_input():
    """Log bad input, a storage failure or a refused merge as one line and exit with status 2.

    Only the project's own error types (`pipeline.errors.REPORTED_ERRORS`) are
    caught: any other exception, a plain ``ValueError`` included, is a bug and
    keeps its traceback (set HYDRA_FULL_ERROR=1 to see it unabridged).
    """
    try:
        yield
    except REPORTED_ERRORS as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(2)
