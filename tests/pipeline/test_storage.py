"""Tests of pipeline.layout, pipeline.storage and pipeline.commit: path validation, layout, commit markers, formats, probes.

Behaviour tests run on a local tmp root (default tier) and on a real
S3-compatible server (moto on loopback, ``-m integration``).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from pipeline import layout
from pipeline.commit import (
    Commit,
    already_committed,
    commit_dir,
    commit_file,
    dir_is_committed,
    file_is_committed,
    read_dir_commit,
    read_file_commit,
    uncommit_dir,
    uncommit_file,
)
from pipeline.errors import CorruptUnitError, StorageError
from pipeline.layout import validate_name
from pipeline.storage import Checksum, Storage

BAD_PARTS = ["..", ".", "a/b", "a\\b", "", ".hidden", "a\0b"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request, tmp_path) -> Storage:
    """A Storage on a fresh local folder, or on a fresh bucket of the test S3 server."""
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage(request.getfixturevalue("s3_env") + "/prefix")


def _table(n: int = 5) -> pa.Table:
    return pa.table(
        {
            "query_id": pa.array([f"q{i % 2}" for i in range(n)], pa.string()),
            "rank": pa.array(range(1, n + 1), pa.int32()),
            "score": pa.array([0.5 * i - 1 for i in range(n)], pa.float64()),
        }
    )


# ------------------------------------------------------------------ names & paths


@pytest.mark.parametrize("value", ["run-2026.11_22", "a", "A9", "x" * 200, "shard-00017"])
def test_validate_name_accepts(value):
    assert validate_name(value, "run.id") == value


@pytest.mark.parametrize(
    "value", ["..", ".", "a/b", "", ".hidden", "a b", "a\\b", "é", "x" * 201, "a\0b"]
)
def test_validate_name_rejects_and_names_value(value):
    with pytest.raises(ValueError) as e:
        validate_name(value, "run.id")
    msg = str(e.value)
    assert "run.id" in msg and "A-Z a-z 0-9" in msg
    assert repr(value[:40]) in msg or value == ""


def test_validate_name_rejects_non_string():
    with pytest.raises(ValueError, match="run.id=2024 must be a string"):
        validate_name(2024, "run.id")


@pytest.mark.parametrize("part", BAD_PARTS)
def test_url_rejects_escaping_parts(tmp_path, part):
    with pytest.raises(ValueError) as e:
        layout.url(str(tmp_path), "runs", part, "x")
    assert repr(part) in str(e.value)
    assert "'/'" in str(e.value)  # says what is allowed


def test_url_allow_hidden_still_refuses_dot_dot(tmp_path):
    assert layout.url(str(tmp_path), ".cache", allow_hidden=True) == f"{tmp_path}/.cache"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        layout.url(str(tmp_path), "..", allow_hidden=True)


@pytest.mark.parametrize("bad", ["..", "a/b", "", ".x"])
def test_layout_helpers_validate_ids(tmp_path, bad):
    root = Storage(str(tmp_path)).root
    for helper in (layout.run_dir, layout.factors_dir, layout.queries_dir, layout.benchmark_result,
                   layout.evaluation_result, layout.factors_file, layout.eigenbases, layout.query_gradients):
        with pytest.raises(ValueError):
            helper(root, bad)
    for helper in (layout.shard_result, layout.covariance_partial, layout.lambda_partial):
        with pytest.raises(ValueError, match="shard id"):
            helper(root, "id1", bad)
    with pytest.raises(ValueError, match="run.id"):
        layout.run_manifest(root, bad)


@pytest.mark.parametrize(
    "root, expected",
    [
        ("s3://bkt/pre/", "s3://bkt/pre"),
        ("s3://bkt", "s3://bkt"),
        ("file:///data/attr", "/data/attr"),
        ("/data/attr/", "/data/attr"),
    ],
)
def test_layout(root, expected):
    s = Storage(root)  # constructing an s3 Storage does not contact the server
    assert s.root == expected
    r = s.root
    assert layout.factors_dir(r, "f1") == f"{expected}/factors/f1"
    assert layout.factors_file(r, "f1") == f"{expected}/factors/f1/factors.safetensors"
    assert layout.covariance_partial(r, "f1", "s-007") == f"{expected}/factors/f1/partials/cov-s-007"
    assert layout.group_file(3, 32) == "003-of-032.safetensors"
    assert layout.lambda_partial(r, "f1", "s-007") == f"{expected}/factors/f1/partials/lambda-s-007.safetensors"
    assert layout.eigenbases(r, "f1") == f"{expected}/factors/f1/eigenbases"
    assert layout.eigenbases_group(r, "f1", 0, 2) == f"{expected}/factors/f1/eigenbases/000-of-002.safetensors"
    assert layout.queries_dir(r, "q1") == f"{expected}/queries/q1"
    assert layout.query_gradients(r, "q1") == f"{expected}/queries/q1/gradients.safetensors"
    assert layout.run_dir(r, "r1") == f"{expected}/runs/r1"
    assert layout.shard_result(r, "r1", "s-007") == f"{expected}/runs/r1/shards/s-007.parquet"
    assert layout.attribution_dir(r, "r1") == f"{expected}/runs/r1/attribution"
    assert layout.attribution_part(r, "r1") == f"{expected}/runs/r1/attribution/part-00000.parquet"
    assert layout.run_manifest(r, "r1") == f"{expected}/runs/r1/manifest.json"
    assert layout.benchmark_result(r, "projection") == f"{expected}/benchmarks/projection.json"
    assert layout.evaluation_result(r, "oracle") == f"{expected}/evaluations/oracle.json"
    assert layout.latest_pointer(r) == f"{expected}/latest.json"
    assert layout.dir_marker(layout.run_dir(r, "r1")) == f"{expected}/runs/r1/_COMMITTED.json"
    assert layout.file_marker(layout.run_manifest(r, "r1")).endswith("manifest.json.commit.json")


def test_relative_local_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("out").root == str(tmp_path / "out")


def test_s3_root_without_bucket_is_refused():
    with pytest.raises(ValueError, match="no bucket"):
        Storage("s3://")


def test_writes_outside_root_are_refused(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(ValueError, match="outside the storage root"):
        storage.write_bytes(str(tmp_path / "elsewhere.bin"), b"x")
    with pytest.raises(ValueError, match="outside the storage root"):
        storage.rm(str(tmp_path / "root-sibling"), recursive=True)
    with pytest.raises(ValueError, match="not on this storage"):
        storage.write_bytes("s3://bkt/x", b"x")


def test_repr_hides_storage_options(tmp_path):
    s = Storage(str(tmp_path), storage_options={"auto_mkdir": True})
    assert repr(s) == f"Storage({str(tmp_path)!r})"


# ------------------------------------------------------------------ commits


def test_commit_cycle_and_rerun_sees_committed(storage, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    url = layout.shard_result(storage.root, "run1", "shard-00003")
    assert not file_is_committed(storage, url)
    assert read_file_commit(storage, url) is None

    storage.write_parquet(url, _table())
    # Data alone is not a committed unit: a crash here leaves nothing readers trust.
    assert storage.exists(url)
    assert not file_is_committed(storage, url)

    commit_file(storage, url, num_rows=5)
    assert file_is_committed(storage, url)
    assert f"committed {url}" in caplog.text

    # A rerun (a fresh Storage, as a new process would build) skips it and logs the skip.
    rerun = Storage(storage.root)
    assert already_committed(rerun, url)
    assert f"skip {url}: already committed" in caplog.text
    record = read_file_commit(rerun, url)
    assert record.recorded() == {"num_rows": 5} and record.num_rows == 5
    assert record.size_bytes == len(rerun.read_bytes(url))
    assert record.committed_at.endswith("+00:00")
    assert rerun.read_json(layout.file_marker(url))["info"] == {"num_rows": 5}  # the marker's form on storage


def test_commit_record_round_trips_and_ignores_unknown_keys():
    record = Commit("2026-11-22T01:02:03.004+00:00", size_bytes=3, shard_id="s1", top_k=10, skipped_docs=["d"])
    assert Commit.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.to_json()["info"] == {"shard_id": "s1", "top_k": 10, "skipped_docs": ["d"]}
    # A marker from a newer writer that records more is still read.
    newer = dict(record.to_json(), info={"top_k": 10, "recorded_by_a_newer_version": 1})
    assert Commit.from_json(newer).top_k == 10


def test_commit_refuses_missing_file(storage):
    url = layout.shard_result(storage.root, "run1", "never-written")
    with pytest.raises(StorageError, match="write the data first"):
        commit_file(storage, url)
    assert not storage.exists(layout.file_marker(url))


def test_marker_is_written_after_data(storage, monkeypatch):
    order = []
    write_bytes = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda u, d: (order.append(u), write_bytes(u, d)))
    url = layout.run_manifest(storage.root, "run1")
    storage.write_json(url, {"a": 1})
    commit_file(storage, url)
    assert order == [url, url + ".commit.json"]


def test_dir_unit_commit_lists_files_and_stays_readable(storage):
    d = layout.attribution_dir(storage.root, "run1")
    storage.write_parquet(layout.attribution_part(storage.root, "run1", 0), _table(3))
    storage.write_parquet(layout.attribution_part(storage.root, "run1", 1), _table(4))
    assert not dir_is_committed(storage, d)
    commit_dir(storage, d, num_queries=2)
    assert dir_is_committed(storage, d)
    assert storage.exists(d + "/_COMMITTED.json")
    record = read_dir_commit(storage, d)
    assert record.num_queries == 2
    assert sorted(record.files) == ["part-00000.parquet", "part-00001.parquet"]
    assert all(size > 0 for size in record.files.values())
    # pyarrow.dataset ignores the "_"-prefixed marker.
    dataset = ds.dataset(storage.fs_path(d), filesystem=storage.fs, format="parquet")
    assert dataset.to_table().num_rows == 7


def test_uncommit_removes_marker_before_data(storage, monkeypatch):
    url = layout.shard_result(storage.root, "run1", "s1")
    storage.write_bytes(url, b"data")
    commit_file(storage, url)
    removed = []
    rm = storage.rm
    monkeypatch.setattr(storage, "rm", lambda u, recursive=False: (removed.append(u), rm(u, recursive)))
    uncommit_file(storage, url)
    assert removed == [url + ".commit.json", url]
    assert not file_is_committed(storage, url)
    assert not storage.exists(url)


def test_uncommit_dir_unit(storage):
    d = layout.factors_dir(storage.root, "f1")
    storage.write_bytes(layout.factors_file(storage.root, "f1"), b"x")
    commit_dir(storage, d)
    uncommit_dir(storage, d)
    assert not dir_is_committed(storage, d)
    assert storage.ls(d) == []
    uncommit_dir(storage, d)  # idempotent


# ------------------------------------------------------------------ formats


def test_json_round_trip_is_sorted_and_strict(storage):
    url = layout.benchmark_result(storage.root, "b1")
    storage.write_json(url, {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}})
    assert storage.read_json(url) == {"a": {"y": True, "z": "ü"}, "b": [1, 2.5, None]}
    text = storage.read_bytes(url).decode()
    assert text.index('"a"') < text.index('"b"') and '\n  "a": {' in text
    with pytest.raises(ValueError, match="benchmarks/b2.json"):
        storage.write_json(layout.benchmark_result(storage.root, "b2"), {"x": float("nan")})


def test_parquet_round_trip_is_deterministic(storage):
    table = _table()
    url1, url2 = layout.shard_result(storage.root, "r", "a"), layout.shard_result(storage.root, "r", "b")
    storage.write_parquet(url1, table)
    storage.write_parquet(url2, table)
    assert storage.read_parquet(url1).equals(table)
    assert storage.read_bytes(url1) == storage.read_bytes(url2)


def test_safetensors_round_trip(storage):
    tensors = {
        "a": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(4, 5).to(torch.bfloat16),
        "t": torch.randn(5, 3).t(),  # non-contiguous
    }
    url = layout.factors_file(storage.root, "f1")
    storage.write_safetensors(url, tensors, metadata={"module": "h.0.mlp", "k": "8"})
    back, metadata = storage.read_safetensors(url)
    assert metadata == {"module": "h.0.mlp", "k": "8"}
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    storage.write_safetensors(url, {"x": torch.zeros(2)})
    assert storage.read_safetensors(url)[1] == {}
    with pytest.raises(TypeError, match="str to str"):
        storage.write_safetensors(url, {"x": torch.zeros(2)}, metadata={"k": 8})


@pytest.mark.parametrize("method", ["read_buffer", "read_mapped"])
def test_buffered_reads_give_read_bytes_content_checked_the_same_way(storage, method):
    """``read_buffer`` (memory-mapped when local) and ``read_mapped`` (always a read-only memory map: a remote
    file is spooled to a temporary file first): the content ``read_bytes`` gives, checked against the commit's
    checksum the same way."""
    read = getattr(storage, method)
    tensors = {"a": torch.randn(64, 32), "b": torch.randn(7, dtype=torch.float64)}
    url = layout.factors_file(storage.root, f"{method}-1")
    storage.write_safetensors(url, tensors)
    checksum = storage.checksum(url)
    data = read(url, checksum)
    assert isinstance(data, mmap.mmap) == (storage.is_local or method == "read_mapped")
    assert bytes(data) == storage.read_bytes(url, checksum)
    back, _ = storage.read_safetensors(url, checksum, cast=lambda n: torch.float64)
    assert all(back[n].dtype == torch.float64 and torch.equal(back[n], t.double()) for n, t in tensors.items())
    empty = layout.factors_file(storage.root, f"{method}-2")
    storage.write_bytes(empty, b"")
    assert read(empty, storage.checksum(empty)) == b""
    storage.write_safetensors(url, {"a": torch.zeros(64, 32)})  # replaced after its commit was recorded
    with pytest.raises(CorruptUnitError, match="does not match its commit marker"):
        read(url, checksum)
    with pytest.raises(FileNotFoundError, match="factors/nope"):
        read(layout.factors_file(storage.root, "nope"))


def test_write_stream_writes_what_the_writer_writes_hashed_and_nothing_when_it_fails(storage):
    """``write_stream``: the bytes written piece by piece land whole, with the checksum a commit records; a
    writer failing half-way leaves the earlier file as it was (nothing new at a fresh URL, no temporary files)."""
    url = layout.factors_file(storage.root, "s1")
    pieces = [b"head", bytes(range(256)) * 1000, memoryview(torch.arange(10, dtype=torch.int32).numpy())]

    def write(f):
        for piece in pieces:
            f.write(piece)

    storage.write_stream(url, write)
    want = b"".join(bytes(p) for p in pieces)
    assert storage.read_bytes(url) == want
    assert storage.written_checksum(url) == Checksum.of(want) == storage.checksum(url)

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("the writer broke")

    with pytest.raises(RuntimeError, match="the writer broke"):
        storage.write_stream(url, failing)
    assert storage.read_bytes(url) == want
    fresh = layout.factors_file(storage.root, "s2")
    with pytest.raises(RuntimeError, match="the writer broke"):
        storage.write_stream(fresh, failing)
    assert not storage.exists(fresh)
    if storage.is_local:
        assert not [p for p in os.listdir(os.path.dirname(storage.fs_path(url))) if p.endswith(".tmp")]


@pytest.mark.integration
@pytest.mark.parametrize("action", ["reading", "writing"])
def test_temporary_copy_without_room_says_where(s3_env, monkeypatch, action):
    """A remote file whose temporary copy (read_mapped's spool of a download, write_stream's of an upload)
    finds the temporary disk full (/dev/full: the kernel's ENOSPC): one StorageError naming the file, the
    folder and the fix; the spool is closed and a file already stored is left as it was."""
    import tempfile

    storage = Storage(s3_env + "/prefix")
    url = layout.factors_file(storage.root, "m3")
    storage.write_bytes(url, b"x" * 1000)
    spools = []

    def full_disk(**kwargs):
        spools.append(open("/dev/full", "w+b"))
        return spools[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", full_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full_disk)
    with pytest.raises(StorageError, match=rf"{action} .*m3.*no room for its temporary copy in .*TMPDIR"):
        if action == "reading":
            storage.read_mapped(url)
        else:
            storage.write_stream(url, lambda f: f.write(b"y" * 100_000))
    assert len(spools) == 1 and spools[0].closed
    assert storage.read_bytes(url) == b"x" * 1000


def test_reading_missing_names_the_url(storage):
    url = layout.run_manifest(storage.root, "nope")
    with pytest.raises(FileNotFoundError, match="runs/nope/manifest.json"):
        storage.read_json(url)


def test_corrupt_parquet_is_a_storage_error(storage):
    url = layout.shard_result(storage.root, "r", "bad")
    storage.write_bytes(url, b"not parquet")
    with pytest.raises(StorageError, match="shards/bad.parquet"):
        storage.read_parquet(url)


def test_read_parquet_dir_joins_the_folders_parquet_files_in_name_order(storage):
    """``read_parquet_dir``: every ``.parquet`` file under the folder, sorted; other and hidden names left out."""
    folder = layout.attribution_dir(storage.root, "r")
    first, second = _table(3), _table(5)
    storage.write_parquet(layout.attribution_part(storage.root, "r", 1), second)
    storage.write_parquet(layout.attribution_part(storage.root, "r", 0), first)
    storage.write_bytes(f"{folder}/_SUCCESS", b"")
    storage.write_bytes(f"{folder}/.part-00002.parquet.tmp", b"partial")
    assert storage.read_parquet_dir(folder).equals(pa.concat_tables([first, second]))
    assert storage.read_parquet_dir(folder, columns=["rank"]).column_names == ["rank"]
    with pytest.raises(StorageError, match="runs/nope/attribution holds no Parquet file"):
        storage.read_parquet_dir(layout.attribution_dir(storage.root, "nope"))
    storage.write_bytes(layout.attribution_part(storage.root, "r", 3), b"not parquet")
    with pytest.raises(StorageError, match="part-00003.parquet is not a readable Parquet file"):
        storage.read_parquet_dir(folder)


def test_ls_glob_rm(storage):
    for name in ("b", "a", "c"):
        storage.write_bytes(layout.shard_result(storage.root, "r", name), name.encode())
    shards = layout.url(layout.run_dir(storage.root, "r"), "shards")
    expected = [layout.shard_result(storage.root, "r", n) for n in "abc"]
    assert storage.ls(shards) == expected
    assert storage.glob(shards + "/*.parquet") == expected
    assert storage.ls(layout.run_dir(storage.root, "missing")) == []
    storage.rm(expected[0])
    storage.rm(expected[0])  # a missing target is fine
    assert storage.ls(shards) == expected[1:]
    storage.rm(layout.run_dir(storage.root, "r"), recursive=True)
    assert not storage.exists(shards)


# ------------------------------------------------------------------ local atomicity


def test_local_write_is_atomic_on_failure(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    url = layout.run_manifest(storage.root, "r")
    storage.write_bytes(url, b"old")

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="simulated crash"):
        storage.write_bytes(url, b"new content")
    monkeypatch.undo()
    assert storage.read_bytes(url) == b"old"
    assert os.listdir(tmp_path / "runs" / "r") == ["manifest.json"]  # no temp file left


def test_local_ls_hides_stray_temp_files(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes(layout.shard_result(storage.root, "r", "a"), b"a")
    (tmp_path / "runs" / "r" / "shards" / ".a.parquet.123-abc.tmp").write_bytes(b"partial")
    assert storage.ls(layout.url(storage.root, "runs", "r", "shards")) == [layout.shard_result(storage.root, "r", "a")]


def test_local_files_respect_umask(tmp_path):
    storage = Storage(str(tmp_path))
    url = layout.run_manifest(storage.root, "r")
    storage.write_bytes(url, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ check_writable


def test_check_writable_passes_and_leaves_no_probe(storage):
    storage.check_writable()
    assert storage.ls(layout.url(storage.root, "_probe")) == []


def test_check_writable_read_only_local_dir(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        try:  # root (uid 0) ignores permission bits: detect by trying
            (root / "canary").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("running with privileges that ignore chmod; read-only dirs are writable")
        with pytest.raises(StorageError) as e:
            Storage(str(root)).check_writable()
        assert str(root) in str(e.value) and "PermissionError" in str(e.value)
    finally:
        root.chmod(0o755)


def test_check_writable_root_under_a_file(tmp_path):
    # Unwritable even for root: a parent of the storage root is a regular file.
    (tmp_path / "afile").write_bytes(b"")
    root = tmp_path / "afile" / "out"
    with pytest.raises(StorageError, match=f"storage root {root} is not writable"):
        Storage(str(root)).check_writable()


@pytest.mark.integration
def test_check_writable_missing_bucket(s3_env):
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError) as e:
        Storage(f"s3://{bucket}/prefix").check_writable()
    msg = str(e.value)
    assert f"s3://{bucket}/prefix" in msg and f"bucket {bucket!r} exists" in msg
    assert "testing" not in msg  # the secret key (AWS_SECRET_ACCESS_KEY=testing)


@pytest.mark.integration
def test_check_writable_rejected_credentials(s3_auth, monkeypatch, caplog):
    import s3fs

    caplog.set_level(logging.DEBUG, logger="pipeline.storage")
    root, key_id, secret = s3_auth
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)

    # The right secret passes under enforced auth, so the failure below is the secret's.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    Storage(root).check_writable()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError) as e:
        Storage(root).check_writable()
    msg = str(e.value)
    assert root in msg and "credentials were rejected" in msg
    assert "signature" in msg.lower()
    assert wrong not in msg and secret not in msg and wrong not in caplog.text

    # The same with the secret given as a storage option.
    with pytest.raises(StorageError) as e:
        Storage(root, storage_options={"key": key_id, "secret": wrong}).check_writable()
    assert wrong not in str(e.value) and wrong not in repr(e.value.__cause__ or "")


@pytest.mark.integration
def test_s3_commit_seen_across_instances_despite_listing(s3_env):
    # Two filesystem instances stand for two processes: a listing made by one
    # before the other commits must not hide the marker (no stale listings cache).
    reader = Storage(s3_env)
    writer = Storage(s3_env, storage_options={"skip_instance_cache": True})
    assert reader.fs is not writer.fs
    url = layout.shard_result(reader.root, "r", "s1")
    shards = layout.url(reader.root, "runs", "r", "shards")
    writer.write_bytes(layout.shard_result(reader.root, "r", "s0"), b"x")
    assert reader.ls(shards) == [layout.shard_result(reader.root, "r", "s0")]
    assert not file_is_committed(reader, url)
    writer.write_bytes(url, b"y")
    commit_file(writer, url)
    assert file_is_committed(reader, url)
    assert reader.ls(shards)[-1] == url + ".commit.json"
