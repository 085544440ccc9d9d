"""Run history and the ``latest.json`` pointer that never goes back (docs/design.md#nightly-runs).

The catalog is one small Parquet file per run, ``{root}/catalog/runs/{run_id}.parquet``
(one row, `CATALOG_SCHEMA`), so concurrent runs never write the same object and
the whole history is one glob: ``read_parquet('{root}/catalog/runs/*.parquet')``.
A run's row is written when it starts (``running``), when its merge commits
(``merged``) or when it fails (``failed``); gc marks the runs it removed
(``deleted``). ``started_at`` is the run id's *first* start: a rerun of an old
night keeps its place in history.

``latest.json`` names the merged run with the latest ``started_at``. A run
that merged writes its row first, then `advance_latest`: it reads the
pointer and moves it only to a run that started later than the one it names,
then reads the catalog again and repeats until the pointer names the newest
merged run. Whoever writes the pointer last re-reads the catalog after
writing, and every merged run's row is written before its pointer write, so
the pointer ends on the newest merged run and never on an older one for
longer than the loser's next check. What remains: object stores offer no
compare-and-swap here, so a reader may briefly see an older run between two
concurrent writers' writes; a driver that dies between its write and its
re-check can leave an older run named until the next run; ``started_at``
comes from the drivers' clocks.
"""

from __future__ import annotations

import datetime as dt
import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.storage import parquet_table

log = logging.getLogger(__name__)

RUNNING, MERGED, FAILED, DELETED = "running", "merged", "failed", "deleted"

CATALOG_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("status", pa.string()),
        ("started_at", pa.string()),  # ISO 8601 UTC, the run id's first start
        ("ended_at", pa.string()),
        ("model_fingerprint", pa.string()),
        ("factors_id", pa.string()),
        ("factors_decision", pa.string()),  # reused | fitted | refitted | policy
        ("queries_id", pa.string()),
        ("queries_fingerprint", pa.string()),
        ("corpus_fingerprint", pa.string()),
        ("results_key", pa.string()),
        ("top_k", pa.int32()),
        ("num_docs", pa.int64()),
        ("num_shards", pa.int64()),
        ("shards_scored", pa.int64()),
        ("shards_reused", pa.int64()),
        ("num_rows", pa.int64()),
        ("attribution", pa.string()),
    ]
)


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def write_entry(storage, row: dict) -> None:
    """Write one run's catalog row (missing columns null)."""
    table = pa.Table.from_pylist([{n: row.get(n) for n in CATALOG_SCHEMA.names}], schema=CATALOG_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(layout.catalog_entry(storage.root, row["run_id"]), sink.getvalue())


def read_entry(storage, run_id: str) -> dict | None:
    """One run's catalog row, or None."""
    try:
        data = storage.read_bytes(layout.catalog_entry(storage.root, run_id))
    except FileNotFoundError:
        return None
    rows = parquet_table(data).to_pylist()
    return rows[0] if rows else None


def read_catalog(storage) -> list[dict]:
    """Every run's row, oldest start first."""
    rows = []
    for url in storage.glob(layout.url(layout.catalog_dir(storage.root), "*.parquet")):
        try:
            rows.extend(parquet_table(storage.read_bytes(url)).to_pylist())
        except FileNotFoundError:  # removed since the listing
            continue
    return sorted(rows, key=lambda r: (r["started_at"] or "", r["run_id"]))


def read_latest(storage) -> dict | None:
    try:
        return storage.read_json(layout.latest_pointer(storage.root))
    except FileNotFoundError:
        return None


def _newer(row: dict, pointer: dict | None) -> bool:
    if pointer is None:
        return True
    return (row["started_at"], row["run_id"]) > (pointer.get("started_at") or "", pointer.get("run_id") or "")


def advance_latest(storage, max_rounds: int = 5) -> dict | None:
    """Point ``latest.json`` at the newest merged run of the catalog, never at one that started earlier.

    Returns the pointer as it stands at the end.
    """
    pointer = read_latest(storage)
    for _ in range(max_rounds):
        merged = [r for r in read_catalog(storage) if r["status"] == MERGED]
        if not merged:
            return pointer
        newest = merged[-1]
        if not _newer(newest, pointer):
            return pointer
        pointer = {"run_id": newest["run_id"], "attribution": newest["attribution"],
                   "started_at": newest["started_at"]}
        storage.write_json(layout.latest_pointer(storage.root), pointer)
        log.info("latest.json -> %s (started %s)", newest["run_id"], newest["started_at"])
        pointer = read_latest(storage)  # re-check: a concurrent writer may have written since
    return pointer
