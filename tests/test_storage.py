"""Tests of pipeline.storage: path validation, layout, commit markers, formats, probes.

Behaviour tests run on a local tmp root (default tier) and on a real
S3-compatible server (moto on loopback, ``-m integration``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from pipeline.storage import Storage, StorageError, validate_name

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
    storage = Storage(str(tmp_path))
    with pytest.raises(ValueError) as e:
        storage.url("runs", part, "x")
    assert repr(part) in str(e.value)
    assert "'/'" in str(e.value)  # says what is allowed


def test_url_allow_hidden_still_refuses_dot_dot(tmp_path):
    storage = Storage(str(tmp_path))
    assert storage.url(".cache", allow_hidden=True) == f"{tmp_path}/.cache"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.url("..", allow_hidden=True)


@pytest.mark.parametrize("bad", ["..", "a/b", "", ".x"])
def test_layout_helpers_validate_ids(tmp_path, bad):
    storage = Storage(str(tmp_path))
    for helper in (storage.run_dir, storage.factors_dir, storage.queries_dir, storage.benchmark):
        with pytest.raises(ValueError):
            helper(bad)
    with pytest.raises(ValueError, match="shard id"):
        storage.shard_result("run1", bad)
    with pytest.raises(ValueError, match="run.id"):
        storage.run_manifest(bad)


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
    assert s.factors_dir("f1") == f"{expected}/factors/f1"
    assert s.queries_dir("q1") == f"{expected}/queries/q1"
    assert s.run_dir("r1") == f"{expected}/runs/r1"
    assert s.shard_result("r1", "s-007") == f"{expected}/runs/r1/shards/s-007.parquet"
    assert s.attribution_dir("r1") == f"{expected}/runs/r1/attribution"
    assert s.run_manifest("r1") == f"{expected}/runs/r1/manifest.json"
    assert s.benchmark("projection") == f"{expected}/benchmarks/projection.json"
    assert s.evaluation("oracle") == f"{expected}/evaluations/oracle.json"
    assert s.latest_pointer() == f"{expected}/latest.json"
    assert s.commit_marker(s.run_dir("r1"), is_dir=True) == f"{expected}/runs/r1/_COMMITTED.json"
    assert s.commit_marker(s.run_manifest("r1"), is_dir=False).endswith("manifest.json.commit.json")


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
    caplog.set_level(logging.INFO, logger="pipeline.storage")
    url = storage.shard_result("run1", "shard-00003")
    assert not storage.is_committed(url, is_dir=False)
    assert storage.read_commit(url, is_dir=False) is None

    storage.write_parquet(url, _table())
    # Data alone is not a committed unit: a crash here leaves nothing readers trust.
    assert storage.exists(url)
    assert not storage.is_committed(url, is_dir=False)

    storage.commit(url, {"rows": 5}, is_dir=False)
    assert storage.is_committed(url, is_dir=False)
    assert f"committed {url}" in caplog.text

    # A rerun (a fresh Storage, as a new process would build) skips it and logs the skip.
    rerun = Storage(storage.root)
    assert rerun.already_committed(url, is_dir=False)
    assert f"skip {url}: already committed" in caplog.text
    record = rerun.read_commit(url, is_dir=False)
    assert record["info"] == {"rows": 5}
    assert record["size_bytes"] == len(rerun.read_bytes(url))
    assert record["committed_at"].endswith("+00:00")


def test_commit_refuses_missing_file(storage):
    url = storage.shard_result("run1", "never-written")
    with pytest.raises(StorageError, match="write the data first"):
        storage.commit(url, {}, is_dir=False)
    assert not storage.exists(storage.commit_marker(url, is_dir=False))


def test_marker_is_written_after_data(storage, monkeypatch):
    order = []
    write_bytes = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda u, d: (order.append(u), write_bytes(u, d)))
    url = storage.run_manifest("run1")
    storage.write_json(url, {"a": 1})
    storage.commit(url, {}, is_dir=False)
    assert order == [url, url + ".commit.json"]


def test_dir_unit_commit_lists_files_and_stays_readable(storage):
    d = storage.attribution_dir("run1")
    storage.write_parquet(storage.url("runs", "run1", "attribution", "part-0.parquet"), _table(3))
    storage.write_parquet(storage.url("runs", "run1", "attribution", "part-1.parquet"), _table(4))
    assert not storage.is_committed(d, is_dir=True)
    storage.commit(d, {"queries": 2}, is_dir=True)
    assert storage.is_committed(d, is_dir=True)
    assert storage.exists(d + "/_COMMITTED.json")
    record = storage.read_commit(d, is_dir=True)
    assert sorted(record["files"]) == ["part-0.parquet", "part-1.parquet"]
    assert all(size > 0 for size in record["files"].values())
    # pyarrow.dataset ignores the "_"-prefixed marker.
    dataset = ds.dataset(storage.fs_path(d), filesystem=storage.fs, format="parquet")
    assert dataset.to_table().num_rows == 7


def test_uncommit_removes_marker_before_data(storage, monkeypatch):
    url = storage.shard_result("run1", "s1")
    storage.write_bytes(url, b"data")
    storage.commit(url, {}, is_dir=False)
    removed = []
    rm = storage.rm
    monkeypatch.setattr(storage, "rm", lambda u, recursive=False: (removed.append(u), rm(u, recursive)))
    storage.uncommit(url, is_dir=False)
    assert removed == [url + ".commit.json", url]
    assert not storage.is_committed(url, is_dir=False)
    assert not storage.exists(url)


def test_uncommit_dir_unit(storage):
    d = storage.factors_dir("f1")
    storage.write_bytes(storage.url("factors", "f1", "layer.safetensors"), b"x")
    storage.commit(d, {}, is_dir=True)
    storage.uncommit(d, is_dir=True)
    assert not storage.is_committed(d, is_dir=True)
    assert storage.ls(d) == []
    storage.uncommit(d, is_dir=True)  # idempotent


# ------------------------------------------------------------------ formats


def test_json_round_trip_is_sorted_and_strict(storage):
    url = storage.benchmark("b1")
    storage.write_json(url, {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}})
    assert storage.read_json(url) == {"a": {"y": True, "z": "ü"}, "b": [1, 2.5, None]}
    text = storage.read_bytes(url).decode()
    assert text.index('"a"') < text.index('"b"') and '\n  "a": {' in text
    with pytest.raises(ValueError, match="benchmarks/b2.json"):
        storage.write_json(storage.benchmark("b2"), {"x": float("nan")})


def test_parquet_round_trip_is_deterministic(storage):
    table = _table()
    url1, url2 = storage.shard_result("r", "a"), storage.shard_result("r", "b")
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
    url = storage.url("factors", "f1", "factors.safetensors")
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


def test_reading_missing_names_the_url(storage):
    url = storage.run_manifest("nope")
    with pytest.raises(FileNotFoundError, match="runs/nope/manifest.json"):
        storage.read_json(url)


def test_corrupt_parquet_is_a_storage_error(storage):
    url = storage.shard_result("r", "bad")
    storage.write_bytes(url, b"not parquet")
    with pytest.raises(StorageError, match="shards/bad.parquet"):
        storage.read_parquet(url)


def test_ls_glob_rm(storage):
    for name in ("b", "a", "c"):
        storage.write_bytes(storage.shard_result("r", name), name.encode())
    shards = storage.url("runs", "r", "shards")
    expected = [storage.shard_result("r", n) for n in "abc"]
    assert storage.ls(shards) == expected
    assert storage.glob(shards + "/*.parquet") == expected
    assert storage.ls(storage.url("runs", "missing")) == []
    storage.rm(expected[0])
    storage.rm(expected[0])  # a missing target is fine
    assert storage.ls(shards) == expected[1:]
    storage.rm(storage.run_dir("r"), recursive=True)
    assert not storage.exists(shards)


# ------------------------------------------------------------------ local atomicity


def test_local_write_is_atomic_on_failure(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    url = storage.run_manifest("r")
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
    storage.write_bytes(storage.shard_result("r", "a"), b"a")
    (tmp_path / "runs" / "r" / "shards" / ".a.parquet.123-abc.tmp").write_bytes(b"partial")
    assert storage.ls(storage.url("runs", "r", "shards")) == [storage.shard_result("r", "a")]


def test_local_files_respect_umask(tmp_path):
    storage = Storage(str(tmp_path))
    url = storage.run_manifest("r")
    storage.write_bytes(url, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ check_writable


def test_check_writable_passes_and_leaves_no_probe(storage):
    storage.check_writable()
    assert storage.ls(storage.url("_probe")) == []


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
    url = reader.shard_result("r", "s1")
    writer.write_bytes(reader.shard_result("r", "s0"), b"x")
    assert reader.ls(reader.url("runs", "r", "shards")) == [reader.shard_result("r", "s0")]
    assert not reader.is_committed(url, is_dir=False)
    writer.write_bytes(url, b"y")
    writer.commit(url, {}, is_dir=False)
    assert reader.is_committed(url, is_dir=False)
    assert reader.ls(reader.url("runs", "r", "shards"))[-1] == url + ".commit.json"
