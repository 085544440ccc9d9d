"""The project's error types, and which of them a job reports as one line (exit status 2).

Bad input (a config value, a corpus or query file, a model folder, factors
that do not fit the model) raises one of `INPUT_ERRORS`; the message names the
input at fault and the fix. The job entry points report those, a storage
failure and a refused merge as one line; anything else is a bug and keeps its
traceback. The input errors raised inside the numeric core are defined there
(the core imports nothing from the pipeline) and re-exported here.
"""

from __future__ import annotations

from pipeline.core.ekfac import FactorMismatchError
from pipeline.core.influence import NonFiniteGradientError
from pipeline.core.text import BadInputError
from pipeline.core.tracking import NoTrackedModulesError


class ConfigError(ValueError):
    """A config value is invalid; the message names the key (e.g. ``score.top_k``) and what is allowed."""


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the reason, never credentials."""


class MergeRefusedError(RuntimeError):
    """The merge would build a wrong table from the committed shard results (missing, stale, other top_k)."""


INPUT_ERRORS = (ConfigError, BadInputError, FactorMismatchError, NoTrackedModulesError, NonFiniteGradientError)

# What a job ends with one line and status 2 instead of a traceback.
REPORTED_ERRORS = (*INPUT_ERRORS, StorageError, MergeRefusedError)

__all__ = [
    "INPUT_ERRORS",
    "REPORTED_ERRORS",
    "BadInputError",
    "ConfigError",
    "FactorMismatchError",
    "MergeRefusedError",
    "NoTrackedModulesError",
    "NonFiniteGradientError",
    "StorageError",
]
