"""Merge shard top-k results into the ranked attribution table (docs/design.md#storage).

Exact: every shard kept its top-k per (query, polarity) under the total
order (score, then ``seq_key``), and so does the merge, so the global top-k
is the top-k of the union of the shards' top-k, ties included. That holds
only when every shard is committed, scored for the run's queries and with
the ``top_k`` asked; `refuse_unmergeable` checks all three first.

The same argument lets the merge stream (`RankingFold`): shard results are
folded into the running top-k a batch at a time, so the driver holds one
batch of shard rankings plus the result, however many shards there are.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit import Commit
from pipeline.errors import MergeRefusedError
from pipeline.tables import CONTRACT_FIELDS

# The document rows' columns a merge reads (`pipeline.shard_result`).
DOCUMENT_COLUMNS = ["query_id", "polarity", "doc_id", "score", "seq_key", "num_windows"]

TABLE_SCHEMA = pa.schema(CONTRACT_FIELDS)


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


def merge_shard_tables(tables: list[pa.Table], top_k: int, extra: tuple[str, ...] = ()) -> pa.Table:
    """The global top-k per (query_id, polarity) from shard tables with a ``seq_key`` column.

    Rows come out ordered by query_id, polarity (proponents first), rank, with
    the contract's columns, then the ``extra`` columns carried from the shard
    rows (e.g. ``text``, ``seq_key``). A table with a ``kind`` column
    (`pipeline.shard_result`) contributes its ``window`` rows only.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    keep = ["query_id", "polarity", "doc_id", "window", "score", "seq_key", *[c for c in extra if c != "seq_key"]]
    parts = [_only_kind(t, "window").select(keep) for t in tables]
    schema = pa.schema([TABLE_SCHEMA.field(n) for n in TABLE_SCHEMA.names] + [_field(tables, c) for c in extra])
    if not parts:
        return schema.empty_table()
    carried = ['"window"', *[f'"{c}"' for c in extra if c != "seq_key"]]
    ranked = _rank(pa.concat_tables(parts), top_k, carried)
    return ranked.select(schema.names).cast(schema)


def merge_document_tables(tables: list[pa.Table], top_k: int) -> pa.Table:
    """The global top-k documents per (query_id, polarity) from the shards' ``document`` rows.

    Exact for the same reason as windows: every shard kept its top-k documents
    under (score, ``seq_key``), and a document's windows are all in one shard.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    parts = [_only_kind(t, "document").select(DOCUMENT_COLUMNS) for t in tables if "kind" in t.column_names]
    return _document_table(parts, top_k)


def _document_table(parts: list[pa.Table], top_k: int) -> pa.Table:
    """The ranked documents table from document rows with ``DOCUMENT_COLUMNS``."""
    schema = pa.schema(
        [("query_id", pa.string()), ("polarity", pa.string()), ("rank", pa.int32()), ("doc_id", pa.string()),
         ("score", pa.float64()), ("num_windows", pa.int32())]
    )
    if not parts:
        return schema.empty_table()
    return _rank(pa.concat_tables(parts), top_k, ["num_windows"]).select(schema.names).cast(schema)


class RankingFold:
    """The global top-k windows and documents of shard results fed a batch at a time (`add`).

    ``windows()`` equals `merge_shard_tables` and ``documents()``
    `merge_document_tables` over every table added, row for row: ranking is
    a total order (score, then the unique ``seq_key``), so the top-k of the
    union is the top-k of (running top-k + next batch). Memory: one batch of
    shard rankings plus ``2 * top_k`` rows per query of each ranking.
    """

    def __init__(self, top_k: int, extra: tuple[str, ...] = ()):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k, self.extra = top_k, extra
        self._window_columns = ["query_id", "polarity", "doc_id", "window", "score", "seq_key",
                                *[c for c in extra if c != "seq_key"]]
        self._carried = ['"window"', *[f'"{c}"' for c in extra if c != "seq_key"]]
        self._windows: pa.Table | None = None  # the running top-k, in the shard rows' columns and types
        self._documents: pa.Table | None = None

    def add(self, tables: list[pa.Table]) -> None:
        """Fold shard result tables (as `merge_shard_tables` takes them) into the running top-k."""
        windows = [_only_kind(t, "window").select(self._window_columns) for t in tables]
        documents = [_only_kind(t, "document").select(DOCUMENT_COLUMNS) for t in tables if "kind" in t.column_names]
        self._windows = self._fold(self._windows, windows, self._carried)
        self._documents = self._fold(self._documents, documents, ["num_windows"])

    def windows(self) -> pa.Table:
        return merge_shard_tables([] if self._windows is None else [self._windows], self.top_k, self.extra)

    def documents(self) -> pa.Table:
        return _document_table([] if self._documents is None else [self._documents], self.top_k)

    def document_keys(self) -> list[int]:
        """The ``seq_key`` of every document in the global top-k (any query, either polarity)."""
        if self._documents is None:
            return []
        return _rank(self._documents, self.top_k, []).column("seq_key").to_pylist()

    def _fold(self, running: pa.Table | None, parts: list[pa.Table], carried: list[str]) -> pa.Table | None:
        if not parts:
            return running
        schema = parts[0].schema
        rows = pa.concat_tables(([] if running is None else [running]) + parts)
        return _rank(rows, self.top_k, carried).select(schema.names).cast(schema)


def top_row_details(windows: pa.Table, details: pa.Table, token_rows: int) -> pa.Table:
    """The shards' ``token`` or ``layer`` rows of the global top ``token_rows`` windows, with their global rank.

    ``windows``: the merged ranking with ``seq_key``; ``details``: shard rows of
    one kind. Ordered by query_id, polarity (proponents first), rank, position.
    """
    con = duckdb.connect()
    try:
        con.register("ranked", windows.select(["query_id", "polarity", "rank", "seq_key"]))
        con.register("details", details)
        return con.sql(
            f"""
            SELECT d.* EXCLUDE (rank), r.rank
            FROM details d JOIN ranked r USING (query_id, polarity, seq_key)
            WHERE r.rank <= {int(token_rows)}
            ORDER BY d.query_id, d.polarity DESC, r.rank, d.position
            """
        ).to_arrow_table()
    finally:
        con.close()


def _only_kind(table: pa.Table, kind: str) -> pa.Table:
    if "kind" not in table.column_names:
        return table
    return table.filter(pc.equal(table.column("kind"), kind))


def _field(tables: list[pa.Table], name: str) -> pa.Field:
    """The type of column ``name`` in the shard tables (`SHARD_RESULT_SCHEMA`'s when there are none)."""
    from pipeline.shard_result import SHARD_RESULT_SCHEMA

    for t in tables:
        if name in t.column_names:
            return t.schema.field(name)
    if name in SHARD_RESULT_SCHEMA.names:
        return SHARD_RESULT_SCHEMA.field(name)
    raise ValueError(f"column {name!r} is in none of the shard tables")


def _rank(rows: pa.Table, top_k: int, carried: list[str]) -> pa.Table:
    """Rows ranked per (query_id, polarity) by (strength, seq_key), the first ``top_k`` of each kept."""
    con = duckdb.connect()
    try:
        con.register("shards", rows)
        extra = "".join(f", {c}" for c in carried)
        return con.sql(
            f"""
            SELECT query_id, polarity,
                   CAST(row_number() OVER (
                       PARTITION BY query_id, polarity
                       ORDER BY CASE WHEN polarity = 'proponent' THEN -score ELSE score END, seq_key
                   ) AS INTEGER) AS rank,
                   doc_id, score, seq_key{extra}
            FROM shards
            QUALIFY rank <= {int(top_k)}
            ORDER BY query_id, polarity DESC, rank
            """
        ).to_arrow_table()
    finally:
        con.close()


def merge_run(ctx) -> pa.Table:
    """The merge stage's writing, once `refuse_unmergeable` passed: every table of the run; the ranked windows.

    ``ctx`` is the driver's `pipeline.context.RunContext` (its workers started):
    worker 0 scores the queries' log-probabilities for the ``queries`` table.
    """
    from pipeline.cluster import call_within
    from pipeline.shard_result import TOKEN_ROWS
    from pipeline.tables import queries_table, run_metadata, write_run_tables

    stats = call_within(ctx.workers[0], "describe_queries", ctx.queries, stall_timeout_s=ctx.cfg.cluster.stall_timeout_s)
    return write_run_tables(
        ctx.storage,
        ctx.cfg.run.id,
        {s.index: ctx.shard_url(s) for s in ctx.shards},
        ctx.cfg.score.top_k,
        queries_table(ctx.queries, stats),
        run_metadata(ctx),
        TOKEN_ROWS,
    )
