"""The run's tables: schemas, provenance metadata, and how they are written (docs/design.md#the-run-tables).

Every table lives in its own folder of the run, ``runs/{run_id}/{table}/part-00000.parquet``,
so one glob per table reads every run's history (``runs/*/attribution/*.parquet``,
``runs/*/documents/*.parquet``, ...). Every row carries ``run_id``; the
schemas below are the same for every run (columns only ever added at the
end). Every file carries the run's provenance as Parquet key-value metadata
(`RunMetadata`), is sorted by ``query_id`` with row groups that never split a
query unless it alone exceeds ``ROW_GROUP_ROWS``, and has column statistics
and a page index, so a reader filtering on ``query_id`` skips the rest.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# A table of a run; the ranked window table keeps the contract's name and place.
ATTRIBUTION = "attribution"
DOCUMENTS = "documents"
QUERIES = "queries"
TOKENS = "tokens"
LAYERS = "layers"
TABLES = (ATTRIBUTION, DOCUMENTS, QUERIES, TOKENS, LAYERS)

# The ranked table's contract columns (docs/design.md#storage), in order: every ranked table starts with them.
CONTRACT_FIELDS = [
    ("query_id", pa.string()),
    ("polarity", pa.string()),
    ("rank", pa.int32()),
    ("doc_id", pa.string()),
    ("window", pa.int32()),
    ("score", pa.float64()),
]

SCHEMA_VERSION = "1"
# The merge reads shard results MERGE_BATCH at a time (its memory: one batch of shard rankings plus the
# running top-k), MERGE_READERS files at once (reads wait on storage, not on the CPU).
MERGE_BATCH = 256
MERGE_READERS = 8
ROW_GROUP_ROWS = 65_536
# Key-value metadata keys (bytes in Parquet; strings here).
META_PREFIX = "attribution."

# The ranked windows: the contract's six columns first, unchanged, then the self-contained extras.
ATTRIBUTION_SCHEMA = pa.schema(
    [
        *CONTRACT_FIELDS,
        ("run_id", pa.string()),
        ("text", pa.string()),  # the window decoded by the worker that scored it, special tokens shown
        ("char_start", pa.int64()),  # the window's span [char_start, char_end) in the document's text
        ("char_end", pa.int64()),
    ]
)

# Documents ranked by the sum of their windows' scores (exact: a document's windows are in one shard).
DOCUMENTS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("polarity", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("score", pa.float64()),
        ("num_windows", pa.int32()),
        ("run_id", pa.string()),
    ]
)

QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("log_prob", pa.float64()),  # log p(completion | prompt) under the model, summed over completion tokens
        ("num_completion_tokens", pa.int32()),
        ("run_id", pa.string()),
    ]
)

# Per token of the top rows' windows: its share of the window's score (shares add up to ``score`` of the row).
TOKENS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("polarity", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("window", pa.int32()),
        ("position", pa.int32()),  # 0-based token position in the window
        ("token_id", pa.int64()),
        ("token_text", pa.string()),
        ("special", pa.bool_()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("score", pa.float64()),
        ("run_id", pa.string()),
    ]
)

# Per tracked layer of the top rows: its share of the row's score (shares add up to ``score`` of the row).
LAYERS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("polarity", pa.string()),
        ("rank", pa.int32()),
        ("doc_id", pa.string()),
        ("window", pa.int32()),
        ("layer_index", pa.int32()),
        ("layer", pa.string()),
        ("score", pa.float64()),
        ("run_id", pa.string()),
    ]
)

SCHEMAS = {
    ATTRIBUTION: ATTRIBUTION_SCHEMA,
    DOCUMENTS: DOCUMENTS_SCHEMA,
    QUERIES: QUERIES_SCHEMA,
    TOKENS: TOKENS_SCHEMA,
    LAYERS: LAYERS_SCHEMA,
}


@dataclass(frozen=True)
class RunMetadata:
    """Provenance written into every table file's key-value metadata (keys ``attribution.<field>``).

    ``char_spans`` says how character spans were found (`pipeline.decoding`):
    ``offsets`` (the tokenizer's offsets mapping) or ``decode_prefix``.
    """

    run_id: str
    model_fingerprint: str
    factors_id: str
    queries_id: str
    config_digest: str
    char_spans: str = ""
    layers: tuple[str, ...] = ()

    def to_parquet(self, table: str) -> dict[bytes, bytes]:
        fields = asdict(self) | {"table": table, "schema_version": SCHEMA_VERSION, "layers": json.dumps(list(self.layers))}
        return {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in fields.items()}

    @classmethod
    def from_parquet(cls, metadata: dict[bytes, bytes] | None) -> dict[str, str]:
        """The ``attribution.*`` keys of a file's key-value metadata, prefix removed."""
        return {
            k.decode()[len(META_PREFIX) :]: v.decode()
            for k, v in (metadata or {}).items()
            if k.decode().startswith(META_PREFIX)
        }


def with_run_id(table: pa.Table, run_id: str, name: str) -> pa.Table:
    """``table`` with its ``run_id`` column set and cast to the named table's schema (columns in order)."""
    schema = SCHEMAS[name]
    columns = {}
    for f in schema:
        if f.name == "run_id":
            columns[f.name] = pa.array([run_id] * table.num_rows, pa.string())
        elif f.name in table.column_names:
            columns[f.name] = table.column(f.name).cast(f.type)
        else:
            columns[f.name] = pa.nulls(table.num_rows, f.type)
    return pa.table(columns, schema=schema)


def row_group_bounds(query_ids: list[str], limit: int = ROW_GROUP_ROWS) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges for rows sorted by query: whole queries per group, up to ``limit`` rows.

    A query with more than ``limit`` rows gets groups of its own, cut at ``limit``.
    """
    bounds: list[tuple[int, int]] = []
    start = 0
    n = len(query_ids)
    i = 0
    while i < n:
        j = i
        while j < n and query_ids[j] == query_ids[i]:
            j += 1
        # The query [i, j) joins the open group if it fits, else closes it.
        if j - start > limit and i > start:
            bounds.append((start, i))
            start = i
        while j - start > limit:
            bounds.append((start, start + limit))
            start += limit
        i = j
    if start < n or not bounds:
        bounds.append((start, n))
    return bounds


def parquet_bytes(table: pa.Table, metadata: RunMetadata, name: str, limit: int = ROW_GROUP_ROWS) -> bytes:
    """One table file: provenance metadata, row groups by ``query_id``, statistics and the page index."""
    table = table.replace_schema_metadata(metadata.to_parquet(name))
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, write_statistics=True, write_page_index=True) as writer:
        for start, end in row_group_bounds(table.column("query_id").to_pylist(), limit):
            writer.write_table(table.slice(start, end - start), row_group_size=max(1, end - start))
    return sink.getvalue().to_pybytes()


def run_metadata(ctx, char_spans: str = "") -> RunMetadata:
    """The provenance of a run (``ctx``: `pipeline.context.RunContext`) for its tables' metadata."""
    from pipeline.identity import digest

    return RunMetadata(
        run_id=ctx.cfg.run.id,
        model_fingerprint=ctx.model_fp,
        factors_id=ctx.factors_id,
        queries_id=ctx.queries_id,
        config_digest=digest(ctx.cfg.to_json()),
        char_spans=char_spans,
        layers=tuple(ctx.layers),
    )


def queries_table(queries, stats: list[dict]) -> pa.Table:
    """The ``queries`` table rows: ``queries`` (`pipeline.corpus.Query`) with the worker's ``log_prob`` and counts."""
    table = pa.table(
        {
            "query_id": [q.id for q in queries],
            "prompt": [q.prompt for q in queries],
            "completion": [q.completion for q in queries],
            "log_prob": [s.get("log_prob") for s in stats],
            "num_completion_tokens": [s.get("num_completion_tokens") for s in stats],
        }
    )
    return table.sort_by("query_id")


def write_run_tables(
    storage,
    run_id: str,
    shard_urls: dict[int, str],
    top_k: int,
    queries: pa.Table,
    metadata: RunMetadata,
    token_rows: int,
) -> pa.Table:
    """Merge the committed shard results of a run and write its five tables; returns the ranked windows.

    ``shard_urls`` maps each shard's index (the high half of ``seq_key``) to
    its result file. Rankings are read from every shard; token and layer rows
    only from the shards holding one of the global top ``token_rows`` windows
    of some query. The ranked table is written last (its folder's commit
    marker, written by the caller after it, vouches for all five).
    """
    from pipeline import layout
    from pipeline.merge import RankingFold, top_row_details
    from pipeline.shard_result import DOCUMENT, LAYER, SHARD_RESULT_SCHEMA, TOKEN, WINDOW, read_shard_result

    from pipeline.results import rekey

    def read(index: int, kinds: tuple[str, ...]) -> tuple[pa.Table, dict]:
        with storage.fs.open(storage.fs_path(shard_urls[index]), "rb") as f:
            table = read_shard_result(f, kinds)
        # A result reused from another run carries that run's shard index; ties break by this run's.
        return rekey(table, index), RunMetadata.from_parquet(table.schema.metadata)

    from tqdm import tqdm

    fold, char_spans = RankingFold(top_k, extra=("text", "char_start", "char_end", "seq_key")), metadata.char_spans
    indices = sorted(shard_urls)
    with ThreadPoolExecutor(MERGE_READERS) as pool, tqdm(total=len(indices), desc="merge: read", unit="shard") as bar:
        for start in range(0, len(indices), MERGE_BATCH):
            batch = list(pool.map(lambda i: read(i, (WINDOW, DOCUMENT)), indices[start : start + MERGE_BATCH]))
            fold.add([table for table, _ in batch])
            char_spans = char_spans or next((m["char_spans"] for _, m in batch if m.get("char_spans")), "")
            bar.update(len(batch))
    windows, documents = fold.windows(), fold.documents()
    keys = windows.filter(pc.less_equal(windows.column("rank"), token_rows)).column("seq_key").to_pylist()
    details = [read(i, (TOKEN, LAYER))[0] for i in sorted({k >> 32 for k in keys})]
    details = pa.concat_tables(details) if details else SHARD_RESULT_SCHEMA.empty_table()
    top = windows.filter(pc.less_equal(windows.column("rank"), token_rows))
    tokens = top_row_details(top, details.filter(pc.equal(details.column("kind"), TOKEN)), token_rows)
    layers = top_row_details(top, details.filter(pc.equal(details.column("kind"), LAYER)), token_rows)
    tokens = tokens.rename_columns(["token_text" if c == "text" else c for c in tokens.column_names])
    layers = layers.rename_columns(
        ["layer" if c == "text" else "layer_index" if c == "position" else c for c in layers.column_names]
    )
    metadata = RunMetadata(**(asdict(metadata) | {"char_spans": char_spans}))
    out = {DOCUMENTS: documents, QUERIES: queries, TOKENS: tokens, LAYERS: layers, ATTRIBUTION: windows}
    for name, table in out.items():
        data = parquet_bytes(with_run_id(table, run_id, name), metadata, name)
        storage.write_bytes(layout.run_table_part(storage.root, run_id, name), data)
    return with_run_id(windows, run_id, ATTRIBUTION)
