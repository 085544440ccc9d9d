"""Corpus and query inputs: listing, validation, deterministic shards, reading.

A corpus is Parquet or JSONL files (a file, a folder or a glob; local or
``s3://``) with an id column and a text column. It is cut into shards of at
most ``docs_per_shard`` rows of one file; a shard's id hashes the file's path
relative to the corpus root, the SHA-256 of its bytes and the row range, so a
rerun over an unchanged listing sees the same shards, and a changed file gets
new shard ids. A `pipeline.fingerprints.FingerprintCache` spares re-reading
files whose size and ETag (or local mtime) did not change.

A null or non-string text cannot be attributed: listing counts them per file
(``corpus.on_bad_text``: ``skip`` reports them and the workers skip those
documents, ``error`` stops the run naming the file). A line of JSONL that is
not JSON or not UTF-8 is an error naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import BadInputError, ConfigError
from pipeline.fingerprints import FingerprintCache, file_identity
from pipeline.unique_ids import UniqueIds

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
# A JSONL file's listing keeps the byte offset of every OFFSET_STRIDE-th record, so a shard reads
# one byte range (at most OFFSET_STRIDE - 1 records before its own) instead of the whole file.
OFFSET_STRIDE = 64


@dataclass(frozen=True)
class CorpusFile:
    url: str
    format: str
    fingerprint: str  # "sha256=<hex>" of the file's bytes
    num_rows: int
    # Rows whose text is null / is not a string (a number, a list...; every row of a non-string Parquet column).
    num_null_texts: int = 0
    num_nonstring_texts: int = 0
    # The path relative to the corpus root (the folder, the glob's fixed prefix, or a single file's folder).
    rel_path: str = ""
    # JSONL: byte offsets of records 0, OFFSET_STRIDE, 2 * OFFSET_STRIDE, ..., then the file's size.
    line_offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_end)`` of one corpus file; ``index`` orders shards in this listing."""

    index: int
    shard_id: str  # stable: hashes rel_path, the file's content and the row range (not the index)
    file_url: str
    format: str
    row_start: int
    row_end: int
    rel_path: str = ""
    # JSONL: the bytes [byte_start, byte_end) hold the rows, byte_start being where record byte_row starts
    # (byte_end -1: the file's end). Not part of the id: the rows are.
    byte_start: int = 0
    byte_end: int = -1
    byte_row: int = 0

    @property
    def num_docs(self) -> int:
        return self.row_end - self.row_start

    def to_json(self) -> dict:
        return asdict(self)


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in FORMATS.items():
        if lower.endswith(suffix):
            return fmt
    return None


def corpus_root(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The folder that relative paths start from: the folder given, a glob's fixed prefix, a file's folder."""
    if any(ch in root for ch in "*?["):
        fixed = root[: min(root.index(ch) for ch in "*?[" if ch in root)]
        return fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    if fs.isdir(root):
        return root.rstrip("/")
    return root.rsplit("/", 1)[0] if "/" in root else ""


def relative_path(root: str, path: str) -> str:
    """``path`` relative to the corpus root ``root`` (both as the filesystem names them)."""
    prefix = root.rstrip("/") + "/" if root else ""
    return path[len(prefix):] if prefix and path.startswith(prefix) else path.rsplit("/", 1)[-1]


def expand_paths(path: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The sorted data files named by a file, a folder or a glob, listed afresh."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    # fsspec reuses filesystem instances with their listings cache: a process running night after night
    # (a scheduler, tests) would otherwise miss files added since its last listing.
    fs.invalidate_cache()
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


def _jsonl_records(fs, path: str, url: str, content=None, offsets: list | None = None) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every non-blank line; a line that is not a UTF-8 JSON object is bad input.

    ``content``: a ``hashlib`` object that every byte of the file is fed to (the listing's fingerprint).
    ``offsets``: a list given the byte offset of every ``OFFSET_STRIDE``-th record, then the file's size.
    """
    records = []
    position = 0
    with fs.open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if content is not None:
                content.update(line)
            position += len(line)
            if not line.strip():
                continue
            if offsets is not None and len(records) % OFFSET_STRIDE == 0:
                offsets.append(position - len(line))
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
    if offsets is not None:
        offsets.append(position)
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


# Bytes per read when a whole file is hashed (the listing's fingerprint): memory stays this size.
HASH_CHUNK = 8 << 20


def _hash_file(fs, path: str, content) -> None:
    """Feed every byte of ``path`` to the ``hashlib`` object ``content``, ``HASH_CHUNK`` bytes at a time."""
    with fs.open(path, "rb", block_size=HASH_CHUNK) as f:
        while chunk := f.read(HASH_CHUNK):
            content.update(chunk)


def _open_parquet(fs, path: str, url: str) -> pq.ParquetFile:
    """The Parquet file over a ranged-read handle: the footer now, column chunks only when read.

    ``cache_type="none"``: every read is one range request of exactly what
    Arrow asks for (the footer, then each column chunk read), not a
    read-ahead block or the whole file.
    """
    try:
        return pq.ParquetFile(fs.open(path, "rb", cache_type="none"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(f"{url} is not a readable Parquet file: {exc}") from None


def _parquet_file(fs, path: str, url: str, content=None) -> pq.ParquetFile:
    """The Parquet file read by ranges (`_open_parquet`); ``content``: a ``hashlib`` object fed all its bytes."""
    if content is not None:
        try:
            _hash_file(fs, path, content)
        except OSError as exc:
            raise BadInputError(f"{url} cannot be read: {exc}") from None
    return _open_parquet(fs, path, url)


def list_corpus(
    path: str,
    id_column: str,
    text_column: str,
    storage_options: dict | None = None,
    check_unique_ids: bool = True,
    on_bad_text: str = "skip",
    cache: FingerprintCache | None = None,
) -> list[CorpusFile]:
    """List and validate the corpus: readable files, required columns, unique ids, not empty.

    Null and non-string texts are counted per file (``CorpusFile.num_null_texts`` /
    ``num_nonstring_texts``) and logged; ``on_bad_text='error'`` makes them a ``BadInputError``.
    ``cache``: files whose size and ETag (local: size, inode, mtime) are unchanged since a listing it
    remembers are not read again (`pipeline.fingerprints`); it is saved when the listing succeeds.
    """
    fs, paths = expand_paths(path, storage_options)
    root = corpus_root(fs, fsspec.core.url_to_fs(path, **(storage_options or {}))[1])
    files = []
    first_bad: dict[str, str] = {}
    unique = UniqueIds(id_column) if check_unique_ids else None
    columns = (id_column, text_column)
    from_cache: list[tuple[str, str, str]] = []  # (path, url, format) of the files not read
    for p in paths:
        url = _unstrip(fs, p)
        fmt = _format_of(p)
        if fmt is None:
            raise BadInputError(f"{url}: unknown format; corpus files must end in .parquet or .jsonl")
        identity = file_identity(fs, p) if cache is not None else None
        cached = cache.get(url, identity, columns) if cache is not None else None
        if cached is not None:
            files.append(replace(cached[0], rel_path=relative_path(root, p)))
            if cached[1] is not None:
                first_bad[url] = cached[1]
            from_cache.append((p, url, fmt))
            continue
        content = hashlib.sha256()
        if fmt == "parquet":
            pf = _parquet_file(fs, p, url, content)
            names = pf.schema_arrow.names
            missing = [c for c in (id_column, text_column) if c not in names]
            if missing:
                raise BadInputError(f"{url} has no column(s) {missing}; it has {names}. Set corpus.id_column/text_column")
            num_rows = pf.metadata.num_rows
            ids = pf.read(columns=[id_column]).column(0) if check_unique_ids else []
            nulls, nonstrings, first = _parquet_bad_texts(pf, text_column)
            if first is not None:
                first_bad[url] = f"row {first}"
        else:
            offsets: list[int] = []
            records = _jsonl_records(fs, p, url, content, offsets)
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
        if unique is not None:
            unique.add(url, ids)
        files.append(CorpusFile(url, fmt, f"sha256={content.hexdigest()}", num_rows, nulls, nonstrings,
                                relative_path(root, p), tuple(offsets) if fmt == "jsonl" else ()))
        if cache is not None:
            cache.put(url, identity, columns, files[-1], first_bad.get(url))
    if unique is not None:
        listing = FingerprintCache.listing_key(files, id_column)
        if cache is not None and len(from_cache) == len(files) and cache.ids_checked(listing):
            unique.close()  # this very listing was checked before
        else:
            for p, url, fmt in from_cache:
                unique.add(url, _file_ids(fs, p, url, fmt, id_column))
            unique.check()
            if cache is not None:
                cache.mark_ids_checked(listing)
    if sum(f.num_rows for f in files) == 0:
        raise BadInputError(f"corpus {path!r} has no documents")
    _report_bad_texts(files, text_column, on_bad_text, first_bad)
    if cache is not None:
        cache.save([f.url for f in files])
    return files


def _file_ids(fs, path: str, url: str, fmt: str, id_column: str):
    """The id column of a file listed before (its id column only, for Parquet)."""
    if fmt == "parquet":
        pf = _open_parquet(fs, path, url)
        try:
            return pf.read(columns=[id_column]).column(0)
        finally:
            pf.close(force=True)
    return [row[id_column] for _, row in _jsonl_records(fs, path, url)]


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


def shard_id(rel_path: str, fingerprint: str, row_start: int, row_end: int) -> str:
    """``s-`` and 20 hex digits of the SHA-256 of what the shard holds: file path (relative), content, rows."""
    key = json.dumps([rel_path, fingerprint, row_start, row_end])
    return "s-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def _byte_range(f: CorpusFile, row_start: int, row_end: int) -> dict:
    """The `Shard` byte fields of rows ``[row_start, row_end)`` of a JSONL file listed with offsets ({} else)."""
    if not f.line_offsets:
        return {}
    first = row_start // OFFSET_STRIDE
    last = -(-row_end // OFFSET_STRIDE)  # the checkpoint at or after row_end; the file's size past the last
    return {
        "byte_start": f.line_offsets[first],
        "byte_end": f.line_offsets[min(last, len(f.line_offsets) - 1)],
        "byte_row": first * OFFSET_STRIDE,
    }


def make_shards(files: list[CorpusFile], docs_per_shard: int) -> list[Shard]:
    """Shards of ``docs_per_shard`` rows of one file, in listing order; ids independent of the other files."""
    shards = []
    for f in files:
        rel = f.rel_path or f.url
        for start in range(0, f.num_rows, docs_per_shard):
            end = min(start + docs_per_shard, f.num_rows)
            shards.append(Shard(len(shards), shard_id(rel, f.fingerprint, start, end), f.url, f.format, start, end,
                                rel, **_byte_range(f, start, end)))
    return shards


def corpus_fingerprint(files: list[CorpusFile]) -> str:
    """SHA-256 of the listing: every file's relative path, content fingerprint and row count."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel_path or f.url}|{f.fingerprint}|{f.num_rows}\n".encode())
    return h.hexdigest()


def corpus_files_json(files: list[CorpusFile], shards: list[Shard] | None = None,
                      scored_per_file: dict[str, int] | None = None) -> dict:
    """The manifest's record of the listing: relative path -> {fingerprint, rows} (to report vanished files).

    With ``shards``, each file also gets ``shards`` (its count), ``shards_scored`` (those in
    ``scored_per_file``, relative path -> shards scored by this run) and ``shards_reused`` (the rest,
    committed results reused).
    """
    record = {f.rel_path or f.url: {"fingerprint": f.fingerprint, "num_rows": f.num_rows} for f in files}
    if shards is not None:
        per_file = Counter(s.rel_path for s in shards)
        scored_per_file = scored_per_file or {}
        for rel, entry in record.items():
            scored = scored_per_file.get(rel, 0)
            entry.update(shards=per_file[rel], shards_scored=scored, shards_reused=per_file[rel] - scored)
    return record


def read_shard(shard: Shard, id_column: str, text_column: str, storage_options: dict | None = None) -> list[tuple[str, str]]:
    """The ``(doc_id, text)`` rows of one shard; a null text reads as empty (reported as skipped).

    Reads only what the shard needs: a Parquet file's footer and the row
    groups holding its rows (two columns), a JSONL file's byte range.
    A file that vanished after the driver listed it is bad input naming the file (rerun to list again).
    """
    fs, path = fsspec.core.url_to_fs(shard.file_url, **(storage_options or {}))
    if not fs.exists(path):
        raise BadInputError(
            f"corpus file {shard.file_url} vanished after this run listed it (shard {shard.shard_id}); "
            "rerun: the listing then leaves it out"
        )
    if shard.format == "parquet":
        ids, texts = _parquet_rows(fs, path, shard, [id_column, text_column])
    else:
        rows = _jsonl_rows(fs, path, shard)
        ids, texts = [r[id_column] for r in rows], [r[text_column] for r in rows]
    return [(str(i), t if isinstance(t, str) else "") for i, t in zip(ids, texts)]


def _parquet_rows(fs, path: str, shard: Shard, columns: list[str]) -> tuple[list, list]:
    """``columns`` (two) of the shard's rows, reading only the row groups that overlap them."""
    pf = _open_parquet(fs, path, shard.file_url)
    try:
        parts, offset = [], 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset < shard.row_end and offset + n > shard.row_start:
                try:
                    table = pf.read_row_group(rg, columns=columns)
                except (pa.ArrowInvalid, OSError) as exc:
                    raise BadInputError(f"{shard.file_url}: row group {rg} cannot be read: {exc}") from None
                lo, hi = max(shard.row_start - offset, 0), min(shard.row_end - offset, n)
                parts.append(table.slice(lo, hi - lo))
            offset += n
    finally:
        pf.close(force=True)  # closes the ranged-read handle too
    table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})
    return table.column(columns[0]).to_pylist(), table.column(columns[1]).to_pylist()


def _jsonl_rows(fs, path: str, shard: Shard) -> list[dict]:
    """The shard's records, parsing only them: one read of its byte range (the whole file when it has none).

    Records are non-blank lines, counted from ``byte_row`` at ``byte_start``;
    the listing checked every line, so a bad one here means the file changed.
    """
    if shard.byte_end >= 0:
        rows = _records_in(fs.cat_file(path, start=shard.byte_start, end=shard.byte_end).split(b"\n"), shard)
    else:
        with fs.open(path, "rb") as f:
            rows = _records_in(f, shard)
    if len(rows) != shard.row_end - shard.row_start:
        raise BadInputError(
            f"{shard.file_url} has {shard.row_start + len(rows)} records, fewer than the {shard.row_end} listed; "
            "the file changed after this run listed it: rerun to list it again"
        )
    return rows


def _records_in(lines, shard: Shard) -> list[dict]:
    """Records ``[row_start, row_end)`` of ``lines`` (bytes, blank ones not counted), the first being ``byte_row``."""
    rows, record = [], shard.byte_row
    for line in lines:
        if not line.strip():
            continue
        if record >= shard.row_end:
            break
        if record >= shard.row_start:
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadInputError(
                    f"{shard.file_url}: record {record + 1} is not JSON any more; the file changed after this "
                    "run listed it: rerun to list it again"
                ) from None
        record += 1
    return rows


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


def hash_sample(shards: list[Shard], count: int, max_documents: int = 0) -> list[Shard]:
    """The ``count`` shards with the smallest hash of their id, in listing order (all when 0 or too large).

    With ``max_documents`` > 0, no more of them, in hash order, than the fewest that hold that many
    documents (all when they hold fewer). Stable as the corpus grows: a shard leaves the sample only
    when a new shard with a smaller hash displaces it, so a refit after growth fits mostly on the
    shards fitted before.
    """
    if max_documents < 0:
        raise ConfigError(f"factors.max_documents must be >= 0 (0 = no cap), got {max_documents}")
    ordered = sorted(shards, key=lambda s: hashlib.sha256(s.shard_id.encode()).digest())
    if 0 < count < len(shards):
        ordered = ordered[:count]
    if max_documents:
        held = np.cumsum([s.num_docs for s in ordered])
        ordered = ordered[: int(np.searchsorted(held, max_documents)) + 1]  # the first prefix holding the count
    if len(ordered) == len(shards):
        return list(shards)
    chosen = {s.shard_id for s in ordered}
    return [s for s in shards if s.shard_id in chosen]


def fit_units(shards: list[Shard], num_workers: int, docs_per_unit: int) -> list[list[Shard]]:
    """The fit's units of work: ``shards`` cut into runs of consecutive shards of about equal documents.

    As many units as it takes for about ``docs_per_unit`` documents each, but no fewer than
    ``num_workers`` (every worker busy) and no more than there are shards; ``docs_per_unit`` 0:
    one unit per shard. Each unit is one task and one partial file of sums, so the units, not
    the shards, set how many such files the fit writes and the workers and driver add up.
    """
    if docs_per_unit < 0:
        raise ConfigError(f"factors.docs_per_unit must be >= 0 (0 = one unit per shard), got {docs_per_unit}")
    if docs_per_unit == 0 or len(shards) <= 1:
        return [[s] for s in shards]
    held = np.cumsum([s.num_docs for s in shards])  # documents up to and including each shard
    total = int(held[-1])
    count = min(len(shards), max(num_workers, -(-total // docs_per_unit), 1))
    starts = [0]
    for i in range(1, count):
        # The cut whose documents before it come closest to i/count of the total; each unit keeps at least
        # one shard and leaves one for each unit after it.
        target = i * total / count
        reach = int(np.searchsorted(held, target))  # the first shard whose documents reach the target
        before = int(held[reach - 1]) if reach else 0
        cut = reach + 1 if held[reach] - target < target - before else reach
        starts.append(min(max(cut, starts[-1] + 1), len(shards) - (count - i)))
    starts.append(len(shards))
    return [shards[a:b] for a, b in zip(starts, starts[1:])]


def unit_key(shards: list[Shard]) -> str:
    """A fit unit's name: its shard's id when it holds one (as partial files were named per shard), else
    ``u-`` and 20 hex digits of the SHA-256 of its shards' ids in order."""
    if len(shards) == 1:
        return shards[0].shard_id
    return "u-" + hashlib.sha256("\n".join(s.shard_id for s in shards).encode()).hexdigest()[:20]
