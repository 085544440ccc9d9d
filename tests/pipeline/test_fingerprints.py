"""The corpus fingerprint cache: an unchanged corpus is listed without reading a byte of it.

Reads are counted where the bytes come from (fsspec's local ``_open``, s3fs's
ranged fetches), so a listing that touched a corpus file shows up, whatever
path inside the listing did it. A file rewritten to the same size with other
bytes is read and hashed again; shard ids always hash the bytes.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig
from pipeline.corpus import corpus_files_json, list_corpus, make_shards
from pipeline.errors import BadInputError
from pipeline.fingerprints import FingerprintCache, cache_url


def write_corpus(folder: str, fs=None) -> None:
    """a.parquet (12 rows), b.jsonl (6 rows), written locally or through ``fs``."""
    table = pa.table({"id": [f"a{i}" for i in range(12)], "text": [f"document a number {i}" for i in range(12)]})
    lines = "".join(json.dumps({"id": f"b{i}", "text": f"document b number {i}"}) + "\n" for i in range(6))
    if fs is None:
        os.makedirs(folder, exist_ok=True)
        pq.write_table(table, f"{folder}/a.parquet", row_group_size=4)
        open(f"{folder}/b.jsonl", "w").write(lines)
    else:
        with fs.open(f"{folder}/a.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=4)
        fs.pipe(f"{folder}/b.jsonl", lines.encode())


@pytest.fixture
def local_reads(monkeypatch):
    """The corpus paths opened through fsspec's local filesystem."""
    opened: list[str] = []
    real = LocalFileSystem._open

    def counting(self, path, *args, **kwargs):
        if "/corpus/" in str(path):
            opened.append(str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting)
    return opened


def listing(corpus: str, root: str, **kwargs):
    cache = FingerprintCache(StorageConfig(root=root).open(), corpus)
    return list_corpus(corpus, "id", "text", cache=cache, **kwargs), cache


def test_a_second_listing_of_an_unchanged_corpus_reads_no_file(tmp_path, local_reads):
    corpus, root = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    first, cache = listing(corpus, root)
    assert (cache.hits, cache.misses) == (0, 2) and local_reads  # read and hashed
    assert os.path.exists(cache_url(root, corpus))
    local_reads.clear()
    second, cache = listing(corpus, root)
    assert (cache.hits, cache.misses) == (1 + 1, 0)
    assert local_reads == []  # not a byte of the corpus: no hashing, no validation, no id check
    assert second == first
    assert [s.shard_id for s in make_shards(second, 4)] == [s.shard_id for s in make_shards(first, 4)]
    # The same as a listing without any cache.
    assert list_corpus(corpus, "id", "text") == first


def test_a_same_size_rewrite_is_hashed_again(tmp_path, local_reads):
    corpus, root = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    before, _ = listing(corpus, root)
    path = f"{corpus}/b.jsonl"
    data = open(path).read()
    changed = data.replace("number 3", "number 7")
    assert len(changed) == len(data)
    open(path, "w").write(changed)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # even a coarse clock sees a new mtime
    local_reads.clear()
    # Without the duplicate-id check (which reads every file's ids when the listing changed) only b is read.
    after, cache = listing(corpus, root, check_unique_ids=False)
    assert (cache.hits, cache.misses) == (1, 1)
    assert any(p.endswith("b.jsonl") for p in local_reads) and not any(p.endswith("a.parquet") for p in local_reads)
    assert after[0] == before[0] and after[1].fingerprint != before[1].fingerprint
    assert after == list_corpus(corpus, "id", "text")  # the content's hash, as without a cache


def test_a_new_file_with_a_duplicate_id_is_still_refused(tmp_path):
    corpus, root = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    listing(corpus, root)
    open(f"{corpus}/c.jsonl", "w").write(json.dumps({"id": "a3", "text": "again"}) + "\n")
    with pytest.raises(BadInputError, match="a3"):
        listing(corpus, root)  # the cached files' ids are read for the check


def test_other_columns_or_a_damaged_cache_read_again(tmp_path, caplog):
    corpus, root = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    first, _ = listing(corpus, root)
    cache = FingerprintCache(StorageConfig(root=root).open(), corpus)
    list_corpus(corpus, "text", "id", check_unique_ids=False, cache=cache)
    assert cache.hits == 0  # validated for other columns
    open(cache_url(root, corpus), "w").write("{not json")
    again, cache = listing(corpus, root)
    assert again == first and cache.misses == 2 and "unreadable" in caplog.text


def test_removed_files_drop_out_of_the_cache(tmp_path):
    corpus, root = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    listing(corpus, root)
    os.remove(f"{corpus}/b.jsonl")
    listing(corpus, root)
    assert list(json.load(open(cache_url(root, corpus)))["files"]) == [f"{corpus}/a.parquet"]


def test_on_s3_the_etag_keys_the_cache(s3_env, monkeypatch):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    corpus, root = f"{s3_env}/corpus", f"{s3_env}/out"
    write_corpus(corpus, fs)
    fetched: list[str] = []
    real = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        if "/corpus/" in self.path:
            fetched.append(self.path)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    first, cache = listing(corpus, root)
    assert cache.misses == 2 and fetched
    fetched.clear()
    second, cache = listing(corpus, root)
    assert second == first and cache.hits == 2 and fetched == []
    # The same size, other bytes: a new ETag, hashed again; the unchanged file is not read.
    data = fs.cat(f"{corpus}/b.jsonl")
    fs.pipe(f"{corpus}/b.jsonl", data.replace(b"number 3", b"number 7"))
    fetched.clear()
    third, cache = listing(corpus, root, check_unique_ids=False)
    assert (cache.hits, cache.misses) == (1, 1) and set(fetched) == {fs._strip_protocol(f"{corpus}/b.jsonl")}
    assert third[1].fingerprint != first[1].fingerprint and third[0] == first[0]


def test_manifest_files_count_shards_scored_and_reused(tmp_path):
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus)
    files = list_corpus(corpus, "id", "text")
    shards = make_shards(files, 4)  # a.parquet: 3 shards, b.jsonl: 2
    record = corpus_files_json(files, shards, {"b.jsonl": 1})
    assert {p: (e["shards"], e["shards_scored"], e["shards_reused"]) for p, e in record.items()} == {
        "a.parquet": (3, 0, 3), "b.jsonl": (2, 1, 1)}
    assert corpus_files_json(files) == {p: {k: e[k] for k in ("fingerprint", "num_rows")} for p, e in record.items()}
