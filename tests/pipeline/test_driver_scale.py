"""A driver that scales (issue 10.6): ranged shard reads, byte-range JSONL shards, the bounded-memory
duplicate-id check, and the streaming merge equal to the one-shot merge."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import corpus
from pipeline.corpus import OFFSET_STRIDE, list_corpus, make_shards, read_shard
from pipeline.errors import BadInputError
from pipeline.merge import RankingFold, merge_document_tables, merge_shard_tables
from pipeline.shard_result import SHARD_RESULT_SCHEMA
from pipeline.unique_ids import UniqueIds
from tests.helpers import write_jsonl


def _parquet_corpus(path: str, rows: int, row_group_size: int) -> pa.Table:
    rng = random.Random(0)
    table = pa.table({
        "id": [f"d{i:06d}" for i in range(rows)],
        "text": ["".join(rng.choice("abcdefghij ") for _ in range(200)) for _ in range(rows)],
        "other": [f"an unread column {i}" * 10 for i in range(rows)],
    })
    pq.write_table(table, path, row_group_size=row_group_size, compression="none")
    return table


def test_a_parquet_shard_reads_its_row_groups_by_range_not_the_file(s3_env, tmp_path, monkeypatch):
    import s3fs

    local = str(tmp_path / "c.parquet")
    table = _parquet_corpus(local, rows=8000, row_group_size=200)
    fs = s3fs.S3FileSystem()
    fs.put(local, f"{s3_env}/corpus/c.parquet")
    size = fs.size(f"{s3_env}/corpus/c.parquet")

    fetched: list[int] = []
    fetch_range = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = fetch_range(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    files = list_corpus(f"{s3_env}/corpus", "id", "text")
    shards = make_shards(files, 100)
    assert len(shards) == 80
    fetched.clear()
    for shard in (shards[0], shards[17], shards[-1]):
        fetched.clear()
        rows = read_shard(shard, "id", "text")
        want = table.slice(shard.row_start, shard.num_docs)
        assert rows == list(zip(want.column("id").to_pylist(), want.column("text").to_pylist()))
        # One row group of two of the three columns, and the footer: a few percent of the file.
        assert sum(fetched) < size / 10, (sum(fetched), size)


def test_jsonl_shards_read_their_byte_range_and_the_rows_of_a_whole_file_read(tmp_path, monkeypatch):
    rng = random.Random(1)
    lines = []
    for i in range(1000):
        if rng.random() < 0.1:
            lines.append("   ")  # blank lines are not records
        lines.append(json.dumps({"id": f"j{i}", "text": "é" * rng.randint(0, 40)}))
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines))  # no newline after the last record
    want = [(r["id"], r["text"]) for r in (json.loads(s) for s in lines if s.strip())]

    ranges: list[tuple[int, int]] = []
    cat_file = type(corpus.fsspec.filesystem("file")).cat_file

    def recording(self, path, start=None, end=None, **kwargs):
        ranges.append((start, end))
        return cat_file(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(type(corpus.fsspec.filesystem("file")), "cat_file", recording)
    (f,) = list_corpus(str(path), "id", "text")
    assert len(f.line_offsets) == -(-1000 // OFFSET_STRIDE) + 1 and f.line_offsets[-1] == path.stat().st_size
    for docs_per_shard in (1, 37, OFFSET_STRIDE, 300, 5000):
        ranges.clear()
        shards = make_shards([f], docs_per_shard)
        got = [row for s in shards for row in read_shard(s, "id", "text")]
        assert got == want
        read = sum(end - start for start, end in ranges)
        # Each shard reads its own records and at most OFFSET_STRIDE - 1 before them.
        assert len(ranges) == len(shards)
        assert read <= path.stat().st_size + len(shards) * f.line_offsets[1], (docs_per_shard, read)


def test_a_shard_without_byte_offsets_still_reads_its_rows(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": f"t{i}"} for i in range(50)])
    shard = corpus.Shard(0, "s", path, "jsonl", 10, 20)
    assert read_shard(shard, "id", "text") == [(str(i), f"t{i}") for i in range(10, 20)]


def test_a_jsonl_file_shortened_after_listing_is_bad_input_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": f"t{i}"} for i in range(50)])
    (shard,) = make_shards(list_corpus(path, "id", "text"), 50)
    write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": f"t{i}"} for i in range(10)])
    with pytest.raises(BadInputError, match="c.jsonl.*changed after this run listed it"):
        read_shard(shard, "id", "text")


def test_the_duplicate_id_check_names_the_id_and_files():
    # The shipped memory limit (DuckDB 2.x cannot run the GROUP BY under 16MB: it raises OutOfMemoryException).
    check = UniqueIds("id")
    for f in range(4):
        check.add(f"f{f}.parquet", pa.array([f"doc-{f}-{i:07d}" for i in range(100_000)]))
    check.add("g.jsonl", [1, 2, "doc-2-0001234"])
    with pytest.raises(BadInputError, match=r"duplicate document id 'doc-2-0001234' \(in f2.parquet and g.jsonl\)"):
        check.check()

    check = UniqueIds("id")
    check.add("a.jsonl", [1, 2, 3])
    check.add("b.jsonl", ["4", 5])
    check.check()  # ids compared as strings: no duplicate
    with pytest.raises(BadInputError, match="c.jsonl has a document with an empty 'id'"):
        UniqueIds("id").add("c.jsonl", [1, None])
    with pytest.raises(BadInputError, match=r"duplicate document id '7' \(in d.jsonl\)"):
        check = UniqueIds("id")
        check.add("d.jsonl", [7, "7"])
        check.check()


def _shard_results(n_shards: int, queries: int, top_k: int, seed: int = 0) -> list[pa.Table]:
    """Shard results with window and document rows, and many tied scores (ties break by ``seq_key``)."""
    rng = np.random.default_rng(seed)
    tables = []
    for s in range(n_shards):
        rows = {name: [] for name in SHARD_RESULT_SCHEMA.names}
        for kind in ("window", "document"):
            for q in range(queries):
                for polarity in ("proponent", "opponent"):
                    for r in range(int(rng.integers(0, top_k + 1))):
                        local = int(rng.integers(0, 1 << 20))
                        values = dict(kind=kind, query_id=f"q{q}", polarity=polarity, rank=r + 1,
                                      doc_id=f"d{s}-{local}", score=float(rng.integers(-3, 4)),
                                      seq_key=(s << 32) | local + r,
                                      window=0 if kind == "window" else None,
                                      text=f"w{local}" if kind == "window" else None,
                                      char_start=0, char_end=5,
                                      num_windows=1 if kind == "document" else None)
                        for name in rows:
                            rows[name].append(values.get(name))
        tables.append(pa.table(rows, schema=SHARD_RESULT_SCHEMA))
    return tables


@pytest.mark.parametrize("batch", [1, 3, 50])
def test_the_streaming_merge_equals_the_one_shot_merge_row_for_row(batch):
    tables = _shard_results(n_shards=23, queries=3, top_k=4)
    extra = ("text", "char_start", "char_end", "seq_key")
    fold = RankingFold(4, extra)
    for start in range(0, len(tables), batch):
        fold.add(tables[start : start + batch])
    assert fold.windows().equals(merge_shard_tables(tables, 4, extra))
    assert fold.documents().equals(merge_document_tables(tables, 4))
    assert fold.windows().num_rows > 0 and fold.documents().num_rows > 0
    empty = RankingFold(4, extra)
    assert empty.windows().equals(merge_shard_tables([], 4, extra))
    assert empty.documents().equals(merge_document_tables([], 4))
