"""What every job entry point shares: how a failure ends the job.

A failure the project knows (`pipeline.errors`) ends the job with one line
naming what failed and an exit status saying whose fault it is: 2 bad input
(or a refused merge), 3 infrastructure (storage, cluster), 1 a bug. When the
failure happened in a Ray worker, the remote traceback goes to a failure log
(in storage, ``runs/{run.id}/logs/``, once the job has named it; a local file
when storage is what failed) and the terminal shows the one line, where the
log is, and the line again, so it is both first and last. A bug raised on the
driver itself keeps its traceback (Hydra prints it and exits 1).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager

from pipeline.errors import INPUT_STATUS, INTERNAL_STATUS, StorageError, exit_status

log = logging.getLogger("pipeline")


class FailureLog:
    """Where a remote traceback is written: a storage URL named by the job, else a local file."""

    def __init__(self) -> None:
        self.storage = None
        self.url: str | None = None

    def point_at(self, storage, url: str) -> None:
        """Write failure logs to ``url`` on ``storage`` (a `pipeline.storage.Storage`) from now on."""
        self.storage, self.url = storage, url

    def write(self, text: str, storage_failed: bool) -> str:
        """Write ``text``; return where it went. Storage is skipped when it is what failed (it would only wait)."""
        if self.storage is not None and self.url and not storage_failed:
            try:
                self.storage.write_bytes(self.url, text.encode("utf-8"))
                return self.url
            except Exception as e:  # the failure being reported matters more than this one
                log.warning("could not write the failure log to %s: %s", self.url, e)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        path = os.path.join(_local_log_dir(), f"failure-{stamp}-{os.getpid()}.log")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


def _local_log_dir() -> str:
    """Hydra's output folder of this job when there is one, else the temporary folder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not under Hydra (tests, Python callers)
        return tempfile.gettempdir()


def _remote(exc: BaseException) -> tuple[BaseException, str | None]:
    # Remote errors exist only when the job started Ray; a job that failed before Ray never imports it.
    if "ray" not in sys.modules:
        return exc, None
    from pipeline.cluster import unwrap_remote

    return unwrap_remote(exc)


def one_line(exc: BaseException) -> str:
    """``ErrorType: message`` on one line."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).splitlines())


@contextmanager
def exit_on_error():
    """End the job on a known failure with one line and its exit status (2, 3, or 1 for a remote bug).

    Yields a `FailureLog` the job points at storage once it knows the run.
    Any other exception raised on the driver, a plain ``ValueError`` included,
    is a bug and keeps its traceback (set HYDRA_FULL_ERROR=1 to see it unabridged).
    Also quiets the storage libraries' INFO logs (`quiet_libraries`).
    """
    quiet_libraries()
    failure_log = FailureLog()
    try:
        yield failure_log
    except Exception as exc:
        cause, remote_traceback = _remote(exc)
        status = exit_status(cause)
        if status == INTERNAL_STATUS and remote_traceback is None:
            raise
        line = one_line(cause)
        log.error("%s", line)
        if remote_traceback is not None and status != INPUT_STATUS:
            text = f"{line}\n\n{remote_traceback}\n\nraised on the driver:\n{traceback.format_exc()}"
            where = failure_log.write(text, storage_failed=isinstance(cause, StorageError))
            log.error("the remote traceback is in %s", where)
            log.error("%s", line)
        sys.exit(status)


# Libraries whose INFO lines (e.g. "Found credentials in environment variables.") would land between a
# job's printed results: Hydra's job logging sends INFO of every logger to stdout.
QUIET_LOGGERS = ("aiobotocore", "botocore", "s3fs", "fsspec", "urllib3")


def quiet_libraries() -> None:
    """Warnings and errors only from the storage libraries (`QUIET_LOGGERS`); the pipeline's own INFO stays."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# The name the jobs used when only bad input ended them this way.
exit_on_bad_input = exit_on_error
