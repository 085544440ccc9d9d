"""Give freed memory back to the operating system between units of work.

A stage's large temporaries (the fit's Lambda sums, eigenbases and file
bytes on the driver; a unit's captured vectors or a layer group's float64
covariance sums on a worker) are freed when it
ends, but glibc keeps much of what it freed in its heap, so a process's
resident memory stays near its peak. On a node shared by the driver and its
workers, Ray's memory monitor counts that memory and kills workers for it
(measured on the 24 GiB build machine: a benchmark driver holding 16 GiB after
the fit while two SmolLM2 workers needed 6 GiB each). ``release`` collects
garbage and asks glibc to return its free pages (``malloc_trim``); it is a
no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import gc
import sys

_LIBC: ctypes.CDLL | None = None


def release() -> None:
    """Collect garbage and return the C heap's free memory to the OS (glibc only)."""
    global _LIBC
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass
