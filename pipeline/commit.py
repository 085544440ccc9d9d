"""Commit markers: a unit of work (one file or one folder) counts as done only when its marker exists.

The marker is a small JSON object written *after* the data, so a crashed or
retried writer never leaves a half-visible result, and a rerun skips what is
committed::

    url = layout.shard_result(storage.root, run_id, shard_id)
    if already_committed(storage, url) is None:
        storage.write_parquet(url, table)
        commit_file(storage, url, shard_id=shard_id, num_rows=table.num_rows)

A file unit's marker is ``{unit}.commit.json`` and holds the file's size and
SHA-256; a folder unit's is ``{unit}/_COMMITTED.json`` and holds the size and
SHA-256 of every file in it (readers can trust exactly those files). Both hold
a UTC timestamp and what the writer recorded about the unit, read back as a
typed `Commit`. On storage the marker is ``{"committed_at": ..., "info":
{recorded fields}, "size_bytes" and "sha256", or "files" and
"files_sha256": ...}``.

Verified units. A unit counts as committed only when its marker exists *and*
its bytes match the marker: `read_file_commit`, `read_dir_commit` and
`already_committed` stream the stored file(s) once through SHA-256 and treat a
unit that differs (changed, truncated, swapped for another unit's valid file,
missing) as not committed, with a WARNING naming it, so a rerun recomputes
it. Readers that load a unit's bytes anyway check them in memory instead
(``storage.read_bytes(url, committed_checksum(storage, url))``), so the check
costs no second download. The checksum of what is committed is taken while
writing (`Storage.write_bytes` hashes the bytes it sends); only a file this
process did not write is read back to hash it. A marker written before
checksums were recorded (no ``sha256``) is treated as not committed: the unit
is recomputed once, which is cheaper than trusting a table nobody can check.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict, dataclass, fields

from pipeline import layout
from pipeline.errors import CorruptUnitError, StorageError
from pipeline.storage import Checksum, Storage

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
    sha256: str | None = None  # a file unit's SHA-256 (hex); None in markers older than checksums
    files_sha256: dict[str, str] | None = None  # a folder unit: relative file name -> SHA-256
    # ---- recorded by the writer
    shard_id: str | None = None
    shard_ids: list[str] | None = None  # a fit unit of several shards: their ids, in order
    factors_id: str | None = None
    queries_id: str | None = None
    top_k: int | None = None
    merged_from: str | None = None
    num_docs: int | None = None
    num_windows: int | None = None
    num_windows_scored: int | None = None  # a shard result: windows scored (fewer when rescoring a shortlist)
    shortlist: str | None = None  # a two-stage shard result: the digest of the shortlist it rescored
    num_tokens: int | None = None
    num_sequences: int | None = None
    num_queries: int | None = None
    num_rows: int | None = None
    num_skipped_docs: int | None = None
    num_nonfinite_windows: int | None = None
    skipped_docs: list[str] | None = None  # a sample of the documents that yielded no window
    nonfinite_windows: list[str] | None = None  # a sample of ``doc_id#window`` left out of the ranking
    query_ids: list[str] | None = None
    # A shard result: the dtype its scoring products ran in on its worker (score.product_dtype resolved there)
    scoring_products: str | None = None
    seconds: float | None = None

    def recorded(self) -> dict:
        """The writer's fields that are set (the marker's ``info``)."""
        return {k: v for k, v in asdict(self).items() if k not in _UNIT_FIELDS and v is not None}

    @property
    def checksum(self) -> Checksum | None:
        """A file unit's `Checksum` (what readers check the bytes against); ``None`` without one."""
        if self.size_bytes is None or self.sha256 is None:
            return None
        return Checksum(self.size_bytes, self.sha256)

    def file_checksums(self) -> dict[str, Checksum] | None:
        """A folder unit's ``{relative name: Checksum}``; ``None`` without checksums."""
        if self.files is None or self.files_sha256 is None or set(self.files) != set(self.files_sha256):
            return None
        return {name: Checksum(size, self.files_sha256[name]) for name, size in self.files.items()}

    def to_json(self) -> dict:
        out = {"committed_at": self.committed_at, "info": self.recorded()}
        for name in _UNIT_FIELDS[1:]:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, d: dict) -> Commit:
        """Parse a marker; recorded keys this version does not know are ignored (older or newer writers)."""
        info = {k: v for k, v in (d.get("info") or {}).items() if k in _RECORDED_FIELDS}
        unit = {k: d.get(k) for k in _UNIT_FIELDS[1:]}
        return cls(d.get("committed_at", ""), **unit, **info)


_UNIT_FIELDS = ("committed_at", "size_bytes", "files", "sha256", "files_sha256")
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
    checksum = _stored_checksum(storage, url, size)
    record = Commit(_now_utc(), size_bytes=checksum.size, sha256=checksum.sha256, **recorded)
    storage.write_json(layout.file_marker(url), record.to_json())
    log.info("committed %s", url)
    return record


def _stored_checksum(storage: Storage, url: str, size: int) -> Checksum:
    """The checksum taken when this process wrote ``url``, or (written elsewhere, or since) a fresh read of it.

    A file replaced by another writer after this process wrote it keeps the
    size only by chance; when it differs the file is hashed again. One that
    kept the size gets this writer's checksum and fails verification later:
    it is then recomputed, never trusted.
    """
    written = storage.written_checksum(url)
    if written is not None and written.size == size:
        return written
    return storage.checksum(url)


def commit_dir(storage: Storage, url: str, **recorded) -> Commit:
    """Mark the fully written folder ``url`` as committed, listing the size and SHA-256 of every file in it."""
    sizes = {k: v for k, v in storage.file_sizes(url).items() if k != layout.DIR_MARKER_NAME}
    checksums = {k: _stored_checksum(storage, f"{url.rstrip('/')}/{k}", size) for k, size in sizes.items()}
    record = Commit(
        _now_utc(),
        files={k: c.size for k, c in checksums.items()},
        files_sha256={k: c.sha256 for k, c in checksums.items()},
        **recorded,
    )
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


_NO_CHECKSUM = "its marker has no checksum (written before checksums were recorded)"


def file_mismatch(storage: Storage, url: str, record: Commit) -> str | None:
    """Why the file unit ``url`` does not match ``record`` (``None`` when it does); reads the file once."""
    if record.checksum is None:
        return _NO_CHECKSUM
    try:
        return record.checksum.mismatch(storage.checksum(url))
    except FileNotFoundError:
        return "the file is missing"


def dir_mismatch(storage: Storage, url: str, record: Commit) -> str | None:
    """Why the folder unit ``url`` does not match ``record`` (``None`` when every listed file does)."""
    checksums = record.file_checksums()
    if checksums is None:
        return _NO_CHECKSUM
    for name, want in checksums.items():
        try:
            why = want.mismatch(storage.checksum(f"{url.rstrip('/')}/{name}"))
        except FileNotFoundError:
            why = "missing"
        if why is not None:
            return f"{name}: {why}"
    return None


def _verified(url: str, record: Commit | None, why: str | None) -> Commit | None:
    if record is not None and why is not None:
        log.warning("%s fails verification against its commit marker (%s); treated as not committed", url, why)
        return None
    return record


def read_file_commit(storage: Storage, url: str, verify: bool = True) -> Commit | None:
    """The commit of the file unit ``url``, or ``None`` when it is not committed.

    With ``verify`` (the default) the file is read once and checked against the
    marker; a unit that fails is logged (WARNING) and counts as not committed.
    ``verify=False`` for a caller that reads the bytes anyway and checks them
    with ``record.checksum``.
    """
    record = _read(storage, layout.file_marker(url))
    if record is None or not verify:
        return record
    return _verified(url, record, file_mismatch(storage, url, record))


def read_dir_commit(storage: Storage, url: str, verify: bool = True) -> Commit | None:
    """The commit of the folder unit ``url``, or ``None`` when not committed (checked as in `read_file_commit`)."""
    record = _read(storage, layout.dir_marker(url))
    if record is None or not verify:
        return record
    return _verified(url, record, dir_mismatch(storage, url, record))


def committed_checksum(storage: Storage, url: str) -> Checksum:
    """The checksum in the file unit's marker, to read it with ``storage.read_bytes(url, expect=...)``.

    Raises `CorruptUnitError` when ``url`` is not committed or its marker has no checksum.
    """
    record = _read(storage, layout.file_marker(url))
    if record is None or record.checksum is None:
        why = "not committed" if record is None else _NO_CHECKSUM
        raise CorruptUnitError(f"{url} cannot be read as a committed unit: {why}; rerun the stage that writes it")
    return record.checksum


def file_is_committed(storage: Storage, url: str) -> bool:
    """Whether the file unit's marker exists (unverified: readers use `read_file_commit` or `committed_checksum`)."""
    return storage.exists(layout.file_marker(url))


def dir_is_committed(storage: Storage, url: str) -> bool:
    """Whether the folder unit's marker exists (unverified)."""
    return storage.exists(layout.dir_marker(url))


def already_committed(storage: Storage, url: str, folder: bool = False) -> Commit | None:
    """The verified `read_file_commit` (`read_dir_commit` for a ``folder`` unit), logging the skip with its URL:
    ``if already_committed(s, u): return``."""
    record = (read_dir_commit if folder else read_file_commit)(storage, url)
    if record is not None:
        log.info("skip %s: already committed", url)
    return record
