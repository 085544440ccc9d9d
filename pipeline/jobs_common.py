"""What every job entry point shares: bad input ends the job with its message, not a stack trace."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from pipeline.core.ekfac import FactorMismatchError
from pipeline.core.text import BadInputError
from pipeline.core.tracking import NoTrackedModulesError
from pipeline.storage import StorageError

log = logging.getLogger("pipeline")

INPUT_ERRORS = (BadInputError, FactorMismatchError, NoTrackedModulesError, StorageError, ValueError)


@contextmanager
def exit_on_bad_input():
    """Log a bad-input error as one line and exit with status 2 (set HYDRA_FULL_ERROR=1 for the trace)."""
    try:
        yield
    except INPUT_ERRORS as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(2)
