"""One shard's scoring result as one Parquet file: ranked windows, ranked documents, tokens and layers of the top rows.

Rows of four kinds share one schema (``kind`` tells them apart; a column
that does not apply to a kind is null):

- ``window``: the shard's top-k windows per (query, polarity), with the
  window's decoded text and character span;
- ``document``: the shard's exact top-k documents per (query, polarity), a
  document's score being the sum of its windows' scores (all its windows are
  in this shard); ``window`` is null, ``num_windows`` counts them;
- ``token``: for the ``token_rows`` strongest windows per (query, polarity),
  one row per token: ``position``, ``token_id``, ``text`` (the token's text),
  ``special``, its span, and ``score``, its share of the window's score;
- ``layer``: for the same windows, one row per tracked layer: ``position``
  is the layer's index, ``text`` its name, ``score`` its share.

With low-rank queries (the default) the shares come from the scoring pass
itself (`KeptBreakdowns`); with dense queries from one more pass over those
windows only.

``seq_key`` is the merge's tie-break: `seq_key(shard, local window index)`
for windows, tokens and layers (the window's key), `seq_key(shard, local
document index)` for documents. Kinds are written in that order, tokens and
layers in row groups of their own, so the merge reads the rankings without
reading token rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.core.topk import TopK
from pipeline.tables import CONTRACT_FIELDS

WINDOW, DOCUMENT, TOKEN, LAYER = "window", "document", "token", "layer"
KINDS = (WINDOW, DOCUMENT, TOKEN, LAYER)

SHARD_RESULT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        *CONTRACT_FIELDS,
        ("seq_key", pa.int64()),
        ("text", pa.string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("num_windows", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int64()),
        ("special", pa.bool_()),
    ]
)

# Windows per (query, polarity) whose per-token and per-layer scores are kept (tokens and layers tables).
TOKEN_ROWS = 5
# Documents are flushed into the top-k accumulator in groups of this many (one sort per group, not per document).
DOCUMENT_FLUSH = 256


def seq_key(shard_index: int, local_index: int) -> int:
    """Global, deterministic tie-break key: shard order, then position in the shard."""
    return (shard_index << 32) | local_index


class DocumentTopK:
    """Exact top-k / bottom-k documents per query, a document's score being the sum of its windows' scores.

    Windows arrive via ``add(doc_index, scores)`` with ``scores`` ``(Q,)`` or
    ``None`` for a window whose score is not finite; such a document is left
    out (its sum is unknown). Without ``windows_per_doc`` they arrive in corpus
    order (a document's windows consecutive) and a document is complete when
    the next one starts; with it (document index -> its number of windows) in
    any order, a document being complete once that many of its windows came.
    Memory: ``O(Q k)``, a group of finished documents, and the sums of the
    documents begun and not complete.
    """

    def __init__(self, shard_index: int, num_queries: int, k: int, windows_per_doc: Mapping[int, int] | None = None):
        self.shard_index = shard_index
        self.num_queries = num_queries
        self.acc = TopK(num_queries, k)
        self.num_windows: dict[int, int] = {}
        self._expected = windows_per_doc
        self._open: dict[int, list] = {}  # document index -> [sum (Q,), all finite, windows so far]
        self._done: list[tuple[int, torch.Tensor]] = []

    def add(self, doc_index: int, scores: torch.Tensor | None) -> None:
        if self._expected is None and doc_index not in self._open:
            for d in list(self._open):  # corpus order: the previous document is complete
                self._finish_document(d)
        entry = self._open.get(doc_index)
        if entry is None:
            entry = self._open[doc_index] = [torch.zeros(self.num_queries, dtype=torch.float64), True, 0]
        entry[2] += 1
        if scores is None:
            entry[1] = False
        else:
            entry[0] += scores.detach().to("cpu", torch.float64)
        if self._expected is not None and entry[2] >= self._expected[doc_index]:
            self._finish_document(doc_index)

    def _finish_document(self, doc_index: int) -> None:
        total, finite, count = self._open.pop(doc_index)
        if finite:
            self._done.append((doc_index, total))
            self.num_windows[doc_index] = count
        if len(self._done) >= DOCUMENT_FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._done:
            scores = torch.stack([s for _, s in self._done])
            keys = torch.tensor([seq_key(self.shard_index, d) for d, _ in self._done], dtype=torch.int64)
            self.acc.update(scores, keys)
            self._done = []

    def finish(self) -> TopK:
        """Close the documents still open; the accumulator (keys are `seq_key(shard, document index)`)."""
        for d in sorted(self._open):
            self._finish_document(d)
        self._flush()
        # Only the kept documents' window counts are needed.
        kept = {k & 0xFFFFFFFF for q in range(self.num_queries) for _, k in self.acc.proponents(q) + self.acc.opponents(q)}
        self.num_windows = {d: n for d, n in self.num_windows.items() if d in kept}
        return self.acc


def ranked(acc: TopK, q: int, limit: int | None = None):
    """``(polarity, rank, score, key)`` of query ``q``'s kept rows, proponents then opponents, strongest first."""
    for polarity, items in (("proponent", acc.proponents(q)), ("opponent", acc.opponents(q))):
        for rank, (score, key) in enumerate(items[:limit] if limit is not None else items, 1):
            yield polarity, rank, score, key


class ShardRows:
    """Column lists in `SHARD_RESULT_SCHEMA` order, filled row by row."""

    def __init__(self):
        self.cols: dict[str, list] = {name: [] for name in SHARD_RESULT_SCHEMA.names}

    def add(self, **values) -> None:
        unknown = set(values) - set(self.cols)
        if unknown:
            raise KeyError(f"not shard result columns: {sorted(unknown)}")
        for name, col in self.cols.items():
            col.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SHARD_RESULT_SCHEMA)


class KeptBreakdowns:
    """Per-layer and per-token scores of the windows in some query's current top ``limit`` (either polarity).

    Updated after each scoring batch from the pass's own breakdown; what drops
    out of every top list is let go, so memory stays at ``2 Q limit`` pairs of
    ``(layers,)`` and ``(tokens,)`` vectors however large the shard.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.shares: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, acc: TopK, locals_: Sequence[int], per_layer: torch.Tensor, per_token: torch.Tensor) -> None:
        """``per_layer`` ``(B, Q, L)``, ``per_token`` ``(B, Q, T)`` of the batch of windows ``locals_`` (in order)."""
        wanted = {(key & 0xFFFFFFFF, q) for q in range(per_layer.shape[1]) for *_, key in ranked(acc, q, self.limit)}
        row = {local: b for b, local in enumerate(locals_)}
        new = [(local, q) for local, q in wanted if local in row and (local, q) not in self.shares]
        if new:
            layers = per_layer.detach().to("cpu", torch.float64)
            tokens = per_token.detach().to("cpu", torch.float64)
            for local, q in new:
                self.shares[(local, q)] = (layers[row[local], q].clone(), tokens[row[local], q].clone())
        self.shares = {pair: v for pair, v in self.shares.items() if pair in wanted}


def document_indices(docs: list[tuple[str, str]], seqs) -> list[int]:
    """Per window of ``seqs`` (in order), the index in ``docs`` of the document it was cut from.

    A window with ``window == 0`` starts the next document with its id
    (documents without windows, e.g. empty ones, are passed over), so ids
    that repeat inside a shard are still told apart.
    """
    out: list[int] = []
    d = -1
    for seq in seqs:
        if seq.window == 0:
            d += 1
            while d < len(docs) and docs[d][0] != seq.doc_id:
                d += 1
            if d == len(docs):
                raise ValueError(f"window {seq.doc_id}#0 has no document in the shard's documents")
        out.append(d)
    return out


def shard_parquet_bytes(table: pa.Table, char_spans: str) -> bytes:
    """The shard result file: one row group per kind, in ``KINDS`` order (empty kinds left out).

    ``char_spans`` (how spans were found, `pipeline.decoding`) goes into the key-value metadata.
    """
    table = table.replace_schema_metadata({b"attribution.char_spans": char_spans.encode()})
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, write_statistics=True) as writer:
        for kind in KINDS:
            part = table.filter(pc.equal(table.column("kind"), kind))
            if part.num_rows:
                writer.write_table(part, row_group_size=part.num_rows)
        if table.num_rows == 0:
            writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_shard_result(source, kinds: tuple[str, ...]) -> pa.Table:
    """The rows of ``kinds`` from a shard result file (``source``: a path, file object or buffer).

    Only the row groups holding those kinds are read. A file without a
    ``kind`` column (written before documents and tokens were kept) holds
    windows only; it is returned with the missing columns null.
    """
    f = pq.ParquetFile(source)
    names = f.schema_arrow.names
    if "kind" not in names:
        table = f.read() if WINDOW in kinds else f.schema_arrow.empty_table()
        cols = {n: table.column(n) if n in names else pa.nulls(table.num_rows, t)
                for n, t in zip(SHARD_RESULT_SCHEMA.names, SHARD_RESULT_SCHEMA.types)}
        cols["kind"] = pa.array([WINDOW] * table.num_rows, pa.string())
        return pa.table(cols, schema=SHARD_RESULT_SCHEMA)
    kind_col = names.index("kind")
    groups = []
    for g in range(f.num_row_groups):
        stats = f.metadata.row_group(g).column(kind_col).statistics
        if stats is None or not stats.has_min_max or any(stats.min <= k <= stats.max for k in kinds):
            groups.append(g)
    table = f.read_row_groups(groups) if groups else f.schema_arrow.empty_table()
    return table.filter(pc.is_in(table.column("kind"), pa.array(list(kinds), pa.string())))
