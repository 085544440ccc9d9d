"""The project's error types, and the exit status a job ends with for each.

Bad input (a config value, a corpus or query file, a model folder, factors
that do not fit the model, a storage root that cannot be used as configured)
raises one of `INPUT_ERRORS`; the message names the input at fault and the
fix. Infrastructure faults (storage that fails or stops answering, a damaged
committed unit, a cluster that cannot place or keeps losing the workers)
raise one of `INFRASTRUCTURE_ERRORS`. The job entry points
(`pipeline.jobs_common`) end with one line and `exit_status`: 2 for bad input
and a refused merge, 3 for infrastructure, 1 for anything else (a bug). The
input errors raised inside the numeric core are defined there (the core
imports nothing from the pipeline) and re-exported here.
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


class StorageConfigError(StorageError):
    """The storage root cannot be used as configured: no such bucket or folder, not writable, credentials refused."""


class CorruptUnitError(StorageError):
    """A committed unit's bytes differ from its commit marker's size or checksum (changed after it was committed)."""


class ClusterError(RuntimeError):
    """The workers cannot be placed on the cluster, or no unit finished within ``cluster.stall_timeout_s``.

    The message names the ``cluster.*`` keys to change.
    """


class MergeRefusedError(RuntimeError):
    """The merge would build a wrong table from the committed shard results (missing, stale, other top_k)."""


INPUT_ERRORS = (
    ConfigError, BadInputError, FactorMismatchError, NoTrackedModulesError, NonFiniteGradientError, StorageConfigError,
)
INFRASTRUCTURE_ERRORS = (StorageError, ClusterError)

# What a job ends with one line instead of a traceback.
REPORTED_ERRORS = (*INPUT_ERRORS, *INFRASTRUCTURE_ERRORS, MergeRefusedError)

INPUT_STATUS = 2
INFRASTRUCTURE_STATUS = 3
INTERNAL_STATUS = 1


def exit_status(exc: BaseException) -> int:
    """2 for bad input or a refused merge, 3 for an infrastructure fault, 1 for anything else."""
    if isinstance(exc, (*INPUT_ERRORS, MergeRefusedError)):
        return INPUT_STATUS
    if isinstance(exc, INFRASTRUCTURE_ERRORS):
        return INFRASTRUCTURE_STATUS
    return INTERNAL_STATUS


__all__ = [
    "INFRASTRUCTURE_ERRORS",
    "INPUT_ERRORS",
    "REPORTED_ERRORS",
    "BadInputError",
    "ClusterError",
    "ConfigError",
    "CorruptUnitError",
    "FactorMismatchError",
    "MergeRefusedError",
    "NoTrackedModulesError",
    "NonFiniteGradientError",
    "StorageConfigError",
    "StorageError",
    "exit_status",
]
