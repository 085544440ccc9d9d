"""Commit markers: a unit of work (one file or one folder) counts as done only when its marker exists.

The marker is a small JSON object written *after* the data, so a crashed or
retried writer never leaves a half-visible result, and a rerun skips what is
committed::

    url = layout.shard_result(storage.root, run_id, shard_id)
    if already_committed(storage, url) is None:
        storage.write_parquet(url, table)
        commit_file(storage, url, shard_id=shard_id, num_rows=table.num_rows)

A file unit's marker is ``{unit}.commit.json`` and holds the file's size; a
folder unit's is ``{unit}/_COMMITTED.json`` and holds the size of every file in
it (readers can trust exactly those files). Both hold a UTC timestamp and what
the writer recorded about the unit, read back as a typed `Commit`. On storage
the marker is ``{"committed_at": ..., "info": {recorded fields}, "size_bytes"
or "files": ...}``.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict, dataclass, fields

from pipeline import layout
from pipeline.errors import StorageError
from pipeline.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Commit:
    """One commit marker: when the unit was committed, its size(s), and what its writer recorded.

    Every recorded field is ``None`` when the writer of that kind of unit does not
    record it: a shard result records the shard, queries and counts; a factors
    file the factors id and token count; a merged table ``merged_from`` and its rows.
    """

    committed_at: str = ""
    size_bytes: int | None = None  # a file unit's size
    files: dict[str, int] | None = None  # a folder unit: relative file name -> size
    # ---- recorded by the writer
    shard_id: str | None = None
    factors_id: str | None = None
    queries_id: str | None = None
    top_k: int | None = None
    merged_from: str | None = None
    num_docs: int | None = None
    num_windows: int | None = None
    num_tokens: int | None = None
    num_sequences: int | None = None
    num_queries: int | None = None
    num_rows: int | None = None
    num_skipped_docs: int | None = None
    num_nonfinite_windows: int | None = None
    skipped_docs: list[str] | None = None  # a sample of the documents that yielded no window
    nonfinite_windows: list[str] | None = None  # a sample of ``doc_id#window`` left out of the ranking
    query_ids: list[str] | None = None
    seconds: float | None = None

    def recorded(self) -> dict:
        """The writer's fields that are set (the marker's ``info``)."""
        return {k: v for k, v in asdict(self).items() if k not in _UNIT_FIELDS and v is not None}

    def to_json(self) -> dict:
        out = {"committed_at": self.committed_at, "info": self.recorded()}
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        if self.files is not None:
            out["files"] = self.files
        return out

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        """Parse a marker; recorded keys this version does not know are ignored (older or newer writers)."""
        info = {k: v for k, v in (d.get("info") or {}).items() if k in _RECORDED_FIELDS}
        return cls(d.get("committed_at", ""), d.get("size_bytes"), d.get("files"), **info)


_UNIT_FIELDS = ("committed_at", "size_bytes", "files")
_RECORDED_FIELDS = frozenset(f.name for f in fields(Commit)) - set(_UNIT_FIELDS)


def _now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# ---- writing ----------------------------------------------------------------------------------


def commit_file(storage: Storage, url: str, **recorded) -> Commit:
    """Mark the fully written file ``url`` as committed (the marker is written last); return the record.

    ``recorded`` are `Commit` fields (e.g. ``num_rows=...``). Raises `StorageError`
    when the file does not exist.
    """
    try:
        size = storage.size(url)
    except FileNotFoundError as e:
        raise StorageError(f"cannot commit {url}: it does not exist; write the data first") from e
    record = Commit(_now_utc(), size_bytes=size, **recorded)
    storage.write_json(layout.file_marker(url), record.to_json())
    log.info("committed %s", url)
    return record


def commit_dir(storage: Storage, url: str, **recorded) -> Commit:
    """Mark the fully written folder ``url`` as committed, listing the size of every file in it."""
    files = {k: v for k, v in storage.file_sizes(url).items() if k != layout.DIR_MARKER_NAME}
    record = Commit(_now_utc(), files=files, **recorded)
    storage.write_json(layout.dir_marker(url), record.to_json())
    log.info("committed %s", url)
    return record


def uncommit_file(storage: Storage, url: str) -> None:
    """Remove the marker first, then the file (for an explicit overwrite); missing parts are fine."""
    storage.rm(layout.file_marker(url))
    storage.rm(url)
    log.info("uncommitted and deleted %s", url)


def uncommit_dir(storage: Storage, url: str) -> None:
    """Remove the marker first, then the folder and everything in it; missing parts are fine."""
    storage.rm(layout.dir_marker(url))
    storage.rm(url, recursive=True)
    log.info("uncommitted and deleted %s", url)


# ---- reading ----------------------------------------------------------------------------------


def _read(storage: Storage, marker: str) -> Commit | None:
    try:
        return Commit.from_json(storage.read_json(marker))
    except FileNotFoundError:
        return None


def read_file_commit(storage: Storage, url: str) -> Commit | None:
    """The commit of the file unit ``url``, or ``None`` when it is not committed."""
    return _read(storage, layout.file_marker(url))


def read_dir_commit(storage: Storage, url: str) -> Commit | None:
    """The commit of the folder unit ``url``, or ``None`` when it is not committed."""
    return _read(storage, layout.dir_marker(url))


def file_is_committed(storage: Storage, url: str) -> bool:
    """Whether the file unit's marker exists (the only test readers may trust)."""
    return storage.exists(layout.file_marker(url))


def dir_is_committed(storage: Storage, url: str) -> bool:
    """Whether the folder unit's marker exists."""
    return storage.exists(layout.dir_marker(url))


def already_committed(storage: Storage, url: str) -> Commit | None:
    """`read_file_commit`, logging the skip with its URL when committed: ``if already_committed(s, u): return``."""
    record = read_file_commit(storage, url)
    if record is not None:
        log.info("skip %s: already committed", url)
    return record
