"""Merge shard top-k results into the ranked attribution table (DESIGN section 4).

Exact: every shard kept its top-k per (query, polarity) under the total
order (score, then ``seq_key``), and so does the merge, so the global top-k
is the top-k of the union of the shards' top-k, ties included.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

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
