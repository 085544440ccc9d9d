"""Merge shard top-k results into the ranked attribution table (DESIGN section 4).

Exact: every shard kept its top-k per (query, polarity) under the total
order (score, then ``seq_key``), and so does the merge, so the global top-k
is the top-k of the union of the shards' top-k, ties included. That holds
only when every shard is committed, scored for the run's queries and with
the ``top_k`` asked; `refuse_unmergeable` checks all three first.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from pipeline.commit import Commit
from pipeline.errors import MergeRefusedError

TABLE_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("polarity", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("window", pa.int32()),
        ("score", pa.float64()),
    ]
)


def refuse_unmergeable(run_id: str, commits: dict[str, Commit | None], queries_id: str, top_k: int) -> None:
    """Raise `MergeRefusedError` unless every shard result is committed, for ``queries_id``, with ``top_k``.

    ``commits`` maps each shard id of the run to its commit (``None``: not committed).
    A shard scored with another ``top_k`` is refused even when its lists are longer:
    the score stage treats it as stale too, and the run's provenance names one ``top_k``.
    """
    missing = [sid for sid, c in commits.items() if c is None]
    if missing:
        raise MergeRefusedError(
            f"cannot merge run {run_id!r}: {len(missing)} shard(s) are not committed, e.g. {missing[:5]}; "
            "run the score stage first"
        )
    stale = [sid for sid, c in commits.items() if c.queries_id != queries_id]
    if stale:
        raise MergeRefusedError(
            f"cannot merge run {run_id!r}: shard(s) {stale[:5]} were scored for other queries; "
            "run the score stage first"
        )
    other = {sid: c.top_k for sid, c in commits.items() if c.top_k != top_k}
    if other:
        found = sorted({k for k in other.values() if k is not None})
        raise MergeRefusedError(
            f"cannot merge run {run_id!r} with score.top_k={top_k}: shard(s) {sorted(other)[:5]} were scored "
            f"with score.top_k={found[0] if len(found) == 1 else found}; run the score stage with "
            f"score.top_k={top_k} first (run.overwrite=true rescores every shard), or merge with the "
            "score.top_k the shards were scored with"
        )


def merge_shard_tables(tables: list[pa.Table], top_k: int) -> pa.Table:
    """The global top-k per (query_id, polarity) from shard tables with a ``seq_key`` column.

    Rows come out ordered by query_id, polarity (proponents first), rank.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not tables:
        return TABLE_SCHEMA.empty_table()
    shards = pa.concat_tables([t.select(["query_id", "polarity", "doc_id", "window", "score", "seq_key"]) for t in tables])
    con = duckdb.connect()
    try:
        con.register("shards", shards)
        result = con.sql(
            f"""
            SELECT query_id, polarity,
                   CAST(row_number() OVER (
                       PARTITION BY query_id, polarity
                       ORDER BY CASE WHEN polarity = 'proponent' THEN -score ELSE score END, seq_key
                   ) AS INTEGER) AS rank,
                   doc_id, CAST("window" AS INTEGER) AS "window", score
            FROM shards
            QUALIFY rank <= {int(top_k)}
            ORDER BY query_id, polarity DESC, rank
            """
        ).to_arrow_table()
    finally:
        con.close()
    return result.cast(TABLE_SCHEMA)
