"""Corpus and query inputs: listing, validation, deterministic shards, reading.

A corpus is Parquet or JSONL files (a file, a folder or a glob; local or
``s3://``) with an id column and a text column. It is cut into shards of at
most ``docs_per_shard`` rows of one file; a shard's id hashes the file's URL,
its fingerprint (size and ETag or modification time) and the row range, so a
rerun over an unchanged listing sees the same shards, and a changed file gets
new shard ids.

A null or non-string text cannot be attributed: listing counts them per file
(``corpus.on_bad_text``: ``skip`` reports them and the workers skip those
documents, ``error`` stops the run naming the file). A line of JSONL that is
not JSON or not UTF-8 is an error naming the file and the line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BadInputError

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class CorpusFile:
    url: str
    format: str
    fingerprint: str
    num_rows: int
    # Rows whose text is null / is not a string (a number, a list...; every row of a non-string Parquet column).
    num_null_texts: int = 0
    num_nonstring_texts: int = 0


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_end)`` of one corpus file; ``index`` orders shards globally."""

    index: int
    shard_id: str
    file_url: str
    format: str
    row_start: int
    row_end: int

    def to_json(self) -> dict:
        return asdict(self)


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in FORMATS.items():
        if lower.endswith(suffix):
            return fmt
    return None


def _file_fingerprint(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag") or ""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"size={info.get('size')};etag={str(etag).strip(chr(34))};mtime={mtime}"


def expand_paths(path: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The sorted data files named by a file, a folder or a glob."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if any(ch in root for ch in "*?["):
        paths = fs.glob(root)
    elif fs.isdir(root):
        paths = [p for p in fs.find(root) if _format_of(p)]
    elif fs.exists(root):
        paths = [root]
    else:
        raise BadInputError(f"input {path!r} does not exist")
    paths = sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith((".", "_")))
    if not paths:
        raise BadInputError(f"input {path!r} names no Parquet or JSONL files")
    return fs, paths


def _unstrip(fs, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _jsonl_records(fs, path: str, url: str) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every non-blank line; a line that is not a UTF-8 JSON object is bad input."""
    records = []
    with fs.open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise BadInputError(
                    f"{url}: line {number} is not valid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                    f"{exc.start + 1}); corpus and query files must be UTF-8"
                ) from None
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{url}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{url}: line {number} is not a JSON object")
            records.append((number, row))
    return records


def _read_jsonl_rows(fs, path: str, url: str) -> list[dict]:
    return [row for _, row in _jsonl_records(fs, path, url)]


def _is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"


def _parquet_bad_texts(pf: pq.ParquetFile, text_column: str) -> tuple[int, int, int | None]:
    """``(nulls, non-strings, first bad row)`` of a Parquet text column, from row-group statistics when present.

    The first bad row is found (by reading the column) only when there is one.
    """
    if not _is_string_type(pf.schema_arrow.field(text_column).type):
        num_rows = pf.metadata.num_rows
        nulls = pf.read(columns=[text_column]).column(0).null_count if num_rows else 0
        return nulls, num_rows - nulls, 0 if num_rows else None
    index = pf.schema_arrow.get_field_index(text_column)
    nulls = 0
    for rg in range(pf.num_row_groups):
        stats = pf.metadata.row_group(rg).column(index).statistics
        if stats is None or not stats.has_null_count:
            nulls = pf.read(columns=[text_column]).column(0).null_count
            break
        nulls += stats.null_count
    if not nulls:
        return 0, 0, None
    column = pf.read(columns=[text_column]).column(0)
    first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
    return nulls, 0, first


def _report_bad_texts(files: list[CorpusFile], text_column: str, on_bad_text: str, first_bad: dict) -> None:
    """Log the files with null or non-string texts; with ``on_bad_text='error'``, refuse the first of them."""
    for f in files:
        if not (f.num_null_texts or f.num_nonstring_texts):
            continue
        where = first_bad[f.url]
        counts = f"{f.num_null_texts} null and {f.num_nonstring_texts} non-string {text_column!r} values"
        if on_bad_text == "error":
            raise BadInputError(
                f"{f.url} has {counts} (first at {where}); fix the file, or set corpus.on_bad_text=skip "
                "to skip those documents"
            )
        log.warning("%s: %s (first at %s); those documents are skipped (corpus.on_bad_text=skip)", f.url, counts, where)


def _parquet_file(fs, path: str, url: str) -> pq.ParquetFile:
    try:
        data = fs.cat_file(path)
        return pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(f"{url} is not a readable Parquet file: {exc}") from None


def list_corpus(
    path: str,
    id_column: str,
    text_column: str,
    storage_options: dict | None = None,
    check_unique_ids: bool = True,
    on_bad_text: str = "skip",
) -> list[CorpusFile]:
    """List and validate the corpus: readable files, required columns, unique ids, not empty.

    Null and non-string texts are counted per file (``CorpusFile.num_null_texts`` /
    ``num_nonstring_texts``) and logged; ``on_bad_text='error'`` makes them a ``BadInputError``.
    """
    fs, paths = expand_paths(path, storage_options)
    files = []
    first_bad: dict[str, str] = {}
    seen: dict[int, str] = {}
    for p in paths:
        url = _unstrip(fs, p)
        fmt = _format_of(p)
        if fmt is None:
            raise BadInputError(f"{url}: unknown format; corpus files must end in .parquet or .jsonl")
        if fmt == "parquet":
            pf = _parquet_file(fs, p, url)
            names = pf.schema_arrow.names
            missing = [c for c in (id_column, text_column) if c not in names]
            if missing:
                raise BadInputError(f"{url} has no column(s) {missing}; it has {names}. Set corpus.id_column/text_column")
            num_rows = pf.metadata.num_rows
            ids = pf.read(columns=[id_column]).column(0).to_pylist() if check_unique_ids else []
            nulls, nonstrings, first = _parquet_bad_texts(pf, text_column)
            if first is not None:
                first_bad[url] = f"row {first}"
        else:
            records = _jsonl_records(fs, p, url)
            nulls = nonstrings = 0
            for number, (line, row) in enumerate(records, 1):
                missing = [c for c in (id_column, text_column) if c not in row]
                if missing:
                    raise BadInputError(f"{url}: record {number} has no field(s) {missing}")
                text = row[text_column]
                if not isinstance(text, str):
                    nulls, nonstrings = nulls + (text is None), nonstrings + (text is not None)
                    first_bad.setdefault(url, f"line {line}")
            num_rows = len(records)
            ids = [row[id_column] for _, row in records] if check_unique_ids else []
        for doc_id in ids:
            if doc_id is None or str(doc_id) == "":
                raise BadInputError(f"{url} has a document with an empty {id_column!r}")
            key = int.from_bytes(hashlib.blake2b(str(doc_id).encode(), digest_size=8).digest(), "little")
            if key in seen:
                raise BadInputError(f"duplicate document id {str(doc_id)!r} (in {seen[key]} and {url}); ids must be unique")
            seen[key] = url
        files.append(CorpusFile(url, fmt, _file_fingerprint(fs.info(p)), num_rows, nulls, nonstrings))
    if sum(f.num_rows for f in files) == 0:
        raise BadInputError(f"corpus {path!r} has no documents")
    _report_bad_texts(files, text_column, on_bad_text, first_bad)
    return files


def bad_text_counts(files: list[CorpusFile]) -> dict:
    """The manifest's counts of null and non-string texts: totals, and per file for the files that have any."""
    return {
        "num_null_texts": sum(f.num_null_texts for f in files),
        "num_nonstring_texts": sum(f.num_nonstring_texts for f in files),
        "bad_texts_per_file": {
            f.url: {"null": f.num_null_texts, "non_string": f.num_nonstring_texts}
            for f in files
            if f.num_null_texts or f.num_nonstring_texts
        },
    }


def make_shards(files: list[CorpusFile], docs_per_shard: int) -> list[Shard]:
    shards = []
    for f in files:
        for start in range(0, f.num_rows, docs_per_shard):
            end = min(start + docs_per_shard, f.num_rows)
            digest = hashlib.sha256(f"{f.url}|{f.fingerprint}|{start}|{end}".encode()).hexdigest()[:12]
            shards.append(Shard(len(shards), f"s{len(shards):06d}-{digest}", f.url, f.format, start, end))
    return shards


def corpus_fingerprint(files: list[CorpusFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.url}|{f.fingerprint}|{f.num_rows}\n".encode())
    return h.hexdigest()


def read_shard(shard: Shard, id_column: str, text_column: str, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """The ``(doc_id, text)`` rows of one shard; a null text reads as empty (reported as skipped)."""
    fs, path = fsspec.core.url_to_fs(shard.file_url, **(storage_options or {}))
    if shard.format == "parquet":
        pf = _parquet_file(fs, path, shard.file_url)
        parts, offset = [], 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset < shard.row_end and offset + n > shard.row_start:
                try:
                    table = pf.read_row_group(rg, columns=[id_column, text_column])
                except (pa.ArrowInvalid, OSError) as exc:
                    raise BadInputError(f"{shard.file_url}: row group {rg} cannot be read: {exc}") from None
                lo, hi = max(shard.row_start - offset, 0), min(shard.row_end - offset, n)
                parts.append(table.slice(lo, hi - lo))
            offset += n
        table = pa.concat_tables(parts) if parts else pa.table({id_column: [], text_column: []})
        ids, texts = table.column(id_column).to_pylist(), table.column(text_column).to_pylist()
    else:
        rows = _read_jsonl_rows(fs, path, shard.file_url)[shard.row_start : shard.row_end]
        ids, texts = [r[id_column] for r in rows], [r[text_column] for r in rows]
    return [(str(i), t if isinstance(t, str) else "") for i, t in zip(ids, texts)]


@dataclass(frozen=True)
class Query:
    id: str
    prompt: str
    completion: str


def read_queries(path: str, storage_options: dict | None = None) -> tuple[list[Query], str]:
    """Queries from JSONL or Parquet, validated; returns them and their content fingerprint."""
    fs, paths = expand_paths(path, storage_options)
    queries: list[Query] = []
    h = hashlib.sha256()
    for p in paths:
        url = _unstrip(fs, p)
        if _format_of(p) == "parquet":
            rows = _parquet_file(fs, p, url).read().to_pylist()
        else:
            rows = _read_jsonl_rows(fs, p, url)
        for number, row in enumerate(rows, 1):
            missing = [k for k in ("id", "prompt", "completion") if row.get(k) is None]
            if missing:
                raise BadInputError(f"{url}: query {number} has no {missing}; queries need id, prompt, completion")
            if not str(row["completion"]):
                raise BadInputError(f"{url}: query {row['id']!r} has an empty completion; there is nothing to attribute")
            q = Query(str(row["id"]), str(row["prompt"]), str(row["completion"]))
            h.update(json.dumps(asdict(q), sort_keys=True).encode())
            queries.append(q)
    if not queries:
        raise BadInputError(f"queries {path!r} contain no queries")
    dup = sorted(i for i, n in Counter(q.id for q in queries).items() if n > 1)
    if dup:
        raise BadInputError(f"duplicate query ids {dup[:5]} in {path!r}")
    return queries, h.hexdigest()


def spread(shards: list[Shard], count: int) -> list[Shard]:
    """``count`` shards evenly spread over the corpus (all when ``count`` is 0 or too large)."""
    if count <= 0 or count >= len(shards):
        return list(shards)
    picks = np.linspace(0, len(shards) - 1, count).round().astype(int)
    return [shards[i] for i in sorted(set(picks.tolist()))]
