"""Issue 8 without Ray: stable shard ids, re-keyed results, pinned factors, the run catalog, latest.json, diff, gc.

Shard ids: re-uploading an unchanged file (new modification time) changes no
id; inserting or removing a file changes no other file's ids; a changed file
gets new ids; a folder and a glob over it give the same ids. The catalog and
latest.json are checked on synthetic rows (an older run merging last does not
move the pointer back); diff and gc on synthetic runs written with the real
layout (gc's dry run deletes nothing; applied, it keeps every object a kept
run references; a policy deleting latest.json's run is refused).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import catalog, layout
from pipeline.commit import commit_dir, commit_file, read_file_commit
from pipeline.config import ConfigError
from pipeline.corpus import hash_sample, list_corpus, make_shards, read_shard
from pipeline.diff import DiffConfig, diff_runs, summary, write_diff
from pipeline.errors import BadInputError
from pipeline.gc import GcConfig, GcOptions, apply_gc, describe, plan_gc
from pipeline.identity import FactorsKey
from pipeline.pinning import plan_factors, write_pin
from pipeline.results import rekey
from pipeline.core.influence import InfluenceConfig
from pipeline.shard_result import seq_key
from pipeline.storage import Storage


def write_jsonl(path, ids):
    with open(path, "w") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "text": f"text of {i}"}) + "\n")


def shard_ids(path, per_shard=2):
    return {s.shard_id: (s.rel_path, s.row_start) for s in make_shards(list_corpus(str(path), "id", "text"), per_shard)}


# ---- stable shard ids -------------------------------------------------------------------------


def test_shard_ids_name_content_not_position_or_mtime(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "b.jsonl", ["b0", "b1", "b2"])
    pq.write_table(pa.table({"id": ["d0", "d1", "d2", "d3"], "text": ["x"] * 4}), corpus / "sub" / "d.parquet")
    first = shard_ids(corpus)
    assert len(first) == 4 and all(s.startswith("s-") for s in first)

    # Re-uploaded unchanged: new modification time, same bytes.
    data = (corpus / "b.jsonl").read_bytes()
    os.remove(corpus / "b.jsonl")
    time.sleep(0.01)
    (corpus / "b.jsonl").write_bytes(data)
    os.utime(corpus / "b.jsonl", (time.time() + 100, time.time() + 100))
    assert shard_ids(corpus) == first

    # A file inserted before the others: every other id unchanged (only listing positions move).
    write_jsonl(corpus / "a.jsonl", ["a0"])
    inserted = shard_ids(corpus)
    assert set(first) < set(inserted) and [inserted[i] for i in set(inserted) - set(first)] == [("a.jsonl", 0)]
    # Removed again: the rest are as before.
    os.remove(corpus / "a.jsonl")
    assert shard_ids(corpus) == first

    # One file's bytes change: only its shards get new ids.
    write_jsonl(corpus / "b.jsonl", ["b0", "b1", "b2-changed"])
    changed = shard_ids(corpus)
    kept = {k: v for k, v in first.items() if v[0] != "b.jsonl"}
    assert kept.items() <= changed.items() and not (set(changed) - set(kept)) & set(first)

    # The same files named by a glob: the same ids (paths are relative to the glob's fixed prefix).
    assert set(shard_ids(f"{corpus}/**/*.*")) == set(changed)


def test_a_file_vanished_after_listing_is_bad_input_naming_it(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["a0", "a1"])
    shard = make_shards(list_corpus(str(tmp_path), "id", "text"), 10)[0]
    os.remove(tmp_path / "a.jsonl")
    with pytest.raises(BadInputError, match="a.jsonl vanished after this run listed it"):
        read_shard(shard, "id", "text")


def test_the_fitting_sample_is_stable_as_the_corpus_grows(tmp_path):
    for n in range(6):
        write_jsonl(tmp_path / f"f{n}.jsonl", [f"f{n}-{i}" for i in range(4)])
    before = {s.shard_id for s in hash_sample(make_shards(list_corpus(str(tmp_path), "id", "text"), 2), 5)}
    for n in range(6, 9):
        write_jsonl(tmp_path / f"f{n}.jsonl", [f"f{n}-{i}" for i in range(4)])
    after = {s.shard_id for s in hash_sample(make_shards(list_corpus(str(tmp_path), "id", "text"), 2), 5)}
    # A shard leaves the sample only when displaced by a new one with a smaller hash.
    new = after - before
    assert len(after) == 5 and len(before - after) == len(new)
    assert all(s not in before for s in new)


def test_rekey_moves_a_result_to_this_runs_shard_index():
    table = pa.table({"seq_key": pa.array([seq_key(7, 0), seq_key(7, 5)], pa.int64()), "x": [1, 2]})
    out = rekey(table, 2)
    assert out.column("seq_key").to_pylist() == [seq_key(2, 0), seq_key(2, 5)] and out.column("x") == table.column("x")


# ---- pinned factors ---------------------------------------------------------------------------


def test_factors_are_pinned_and_refitted_only_when_asked_or_by_policy(tmp_path):
    storage = Storage(str(tmp_path))
    for n in range(4):
        write_jsonl(tmp_path / f"c{n}.jsonl", [f"c{n}-{i}" for i in range(4)])
    shards = make_shards(list_corpus(str(tmp_path), "id", "text", check_unique_ids=False), 4)
    inf = InfluenceConfig()

    def plan(shards, refit=False, share=0.0, model="m"):
        key = FactorsKey.of(inf, model, 64, [s.shard_id for s in shards])
        return plan_factors(storage, key, shards, shards, shards, 0, 1.0, refit, share)

    first = plan(shards[:2])
    assert first.decision == "fitted" and first.fitted_docs == 8
    url = layout.factors_file(storage.root, first.key.id)
    storage.write_bytes(url, b"factors")
    commit_file(storage, url, factors_id=first.key.id)
    write_pin(storage, first, 8, "night-1")

    grown = plan(shards)  # the corpus doubled: the pinned factors are reused, the sample they were fitted on kept
    assert grown.decision == "reused" and grown.key == first.key and "50.0%" in grown.reason
    assert plan(shards, share=0.6).decision == "policy"  # fitted on 50% < 60%
    assert plan(shards, refit=True).decision == "refitted"
    assert plan(shards, model="new-checkpoint").decision == "fitted"  # another setting: no pin
    storage.rm(layout.file_marker(url))  # the pinned factors are gone: refit on the same sample, same id
    again = plan(shards)
    assert again.decision == "refitted" and again.key == first.key
    assert [s.shard_id for s in again.fit_shards] == [s.shard_id for s in shards[:2]]


# ---- catalog and latest.json --------------------------------------------------------------------


def row(run_id, started, status="merged"):
    return {"run_id": run_id, "status": status, "started_at": started, "attribution": f"x/{run_id}"}


def test_latest_never_moves_back_to_a_run_that_started_earlier(tmp_path):
    storage = Storage(str(tmp_path))
    catalog.write_entry(storage, row("old", "2026-11-22T01:00:00+00:00", "running"))
    catalog.write_entry(storage, row("new", "2026-11-23T01:00:00+00:00"))
    assert catalog.advance_latest(storage)["run_id"] == "new"
    catalog.write_entry(storage, row("old", "2026-11-22T01:00:00+00:00"))  # the older run merges last
    assert catalog.advance_latest(storage)["run_id"] == "new"
    assert catalog.read_latest(storage)["started_at"] == "2026-11-23T01:00:00+00:00"
    # A stale pointer (an older run wrote after the check of a newer one) is repaired by the next check.
    storage.write_json(layout.latest_pointer(storage.root), {"run_id": "old", "started_at": "2026-11-22T01:00:00+00:00"})
    assert catalog.advance_latest(storage)["run_id"] == "new"
    rows = catalog.read_catalog(storage)
    assert [r["run_id"] for r in rows] == ["old", "new"] and rows[0]["status"] == "merged"
    assert pq.read_table(layout.catalog_dir(storage.root)).num_rows == 2  # the whole history by one glob


# ---- synthetic runs for diff and gc -----------------------------------------------------------


def fake_run(storage, run_id, started, rows, queries_fp="qfp", factors="f-1", queries="q-1", key="r-1",
             shards=("s-a", "s-b")):
    root = storage.root
    for sid in shards:
        url = layout.shared_shard_result(root, key, sid)
        if not os.path.exists(url):
            storage.write_bytes(url, sid.encode())
            commit_file(storage, url, shard_id=sid, top_k=3, queries_id=queries)
    for url in (layout.factors_file(root, factors), layout.eigenbases_group(root, factors, 0, 1),
                layout.legacy_eigenbases(root, factors),  # as fits before 2026-12-07 left it
                layout.url(layout.covariance_partial(root, factors, shards[0]), layout.group_file(0, 1)),
                layout.query_gradients(root, queries)):
        if not os.path.exists(url):
            storage.write_bytes(url, b"t")
            commit_file(storage, url)
    table = pa.Table.from_pylist(
        [dict(zip(("query_id", "polarity", "rank", "doc_id", "window", "score"), r)) for r in rows],
        schema=pa.schema([("query_id", pa.string()), ("polarity", pa.string()), ("rank", pa.int32()),
                          ("doc_id", pa.string()), ("window", pa.int32()), ("score", pa.float64())]))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(layout.attribution_part(root, run_id), sink.getvalue())
    commit_dir(storage, layout.attribution_dir(root, run_id))
    storage.write_json(layout.run_manifest(root, run_id), {
        "run_id": run_id, "factors_id": factors, "queries_id": queries, "shards": list(shards),
        "queries": {"fingerprint": queries_fp}, "results": {"key": key}})
    catalog.write_entry(storage, row(run_id, started) | {"attribution": layout.attribution_dir(root, run_id)})
    catalog.advance_latest(storage)


A_ROWS = [("q1", "proponent", 1, "d1", 0, 3.0), ("q1", "proponent", 2, "d2", 0, 2.0),
          ("q1", "opponent", 1, "d3", 1, -1.0)]
B_ROWS = [("q1", "proponent", 1, "d2", 0, 2.5), ("q1", "proponent", 2, "d4", 0, 2.1),
          ("q1", "opponent", 1, "d3", 1, -1.2)]


def test_diff_lists_rows_that_entered_left_or_moved(tmp_path):
    storage = Storage(str(tmp_path))
    fake_run(storage, "a", "2026-11-22T00:00:00+00:00", A_ROWS)
    fake_run(storage, "b", "2026-11-23T00:00:00+00:00", B_ROWS)
    table = diff_runs(storage, "a", "b")
    got = {(r["doc_id"], r["change"], r["rank_a"], r["rank_b"]) for r in table.to_pylist()}
    assert got == {("d1", "left", 1, None), ("d2", "moved", 2, 1), ("d4", "entered", None, 2)}
    url = write_diff(storage, "a", "b", table)
    assert pq.read_table(url).num_rows == 3
    text = summary("a", "b", table, url)
    assert text.splitlines()[0].startswith("a -> b: 1 entered, 1 left, 1 moved in 1 query")


def test_diff_between_different_query_sets_is_one_clear_line(tmp_path):
    storage = Storage(str(tmp_path))
    fake_run(storage, "a", "2026-11-22T00:00:00+00:00", A_ROWS)
    fake_run(storage, "c", "2026-11-23T00:00:00+00:00", B_ROWS, queries_fp="other")
    with pytest.raises(BadInputError, match="different query sets") as e:
        diff_runs(storage, "a", "c")
    assert "\n" not in str(e.value)
    with pytest.raises(BadInputError, match="no merged run"):
        diff_runs(storage, "a", "missing")
    with pytest.raises(ConfigError):
        DiffConfig(diff=type(DiffConfig().diff)("a", "a")).validate()


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def three_nights(storage):
    fake_run(storage, "n1", "2026-11-21T00:00:00+00:00", A_ROWS, factors="f-old", queries="q-old", key="r-old")
    fake_run(storage, "n2", "2026-11-22T00:00:00+00:00", A_ROWS, shards=("s-a", "s-b", "s-c"))
    fake_run(storage, "n3", "2026-11-23T00:00:00+00:00", B_ROWS, shards=("s-a", "s-c"))


def test_gc_dry_run_deletes_nothing_and_apply_keeps_what_kept_runs_reference(tmp_path):
    storage = Storage(str(tmp_path))
    three_nights(storage)
    before = files_under(tmp_path)
    plan = plan_gc(storage, keep_last=1, keep_days=0)
    assert plan.kept_runs == ["n3"] and plan.deleted_runs == ["n1", "n2"]
    text = describe(plan, applied=False)
    assert "would delete" in text and "dry run" in text
    assert files_under(tmp_path) == before  # planning deleted nothing

    apply_gc(storage, plan)
    root = storage.root
    assert not os.path.exists(layout.run_dir(root, "n1")) and not os.path.exists(layout.run_dir(root, "n2"))
    assert not os.path.exists(layout.factors_dir(root, "f-old")) and not os.path.exists(layout.results_dir(root, "r-old"))
    assert not os.path.exists(layout.queries_dir(root, "q-old"))
    # n3's results (s-a, s-c under r-1) kept; s-b, referenced only by n2, gone with its marker.
    for sid in ("s-a", "s-c"):
        assert read_file_commit(storage, layout.shared_shard_result(root, "r-1", sid)) is not None
    assert not os.path.exists(layout.shared_shard_result(root, "r-1", "s-b"))
    assert not os.path.exists(layout.file_marker(layout.shared_shard_result(root, "r-1", "s-b")))
    # The kept factors file stays; their fitting partials and eigenbases go.
    assert read_file_commit(storage, layout.factors_file(root, "f-1")) is not None
    assert not os.path.exists(layout.covariance_partial(root, "f-1", "s-a"))
    assert not os.path.exists(layout.eigenbases(root, "f-1"))
    assert not os.path.exists(layout.legacy_eigenbases(root, "f-1"))
    assert pq.read_table(layout.attribution_dir(root, "n3")).num_rows == 3
    status = {r["run_id"]: r["status"] for r in catalog.read_catalog(storage)}
    assert status == {"n1": "deleted", "n2": "deleted", "n3": "merged"}
    assert plan_gc(storage, keep_last=1, keep_days=0).deleted_runs == []  # nothing left to delete


def test_gc_removes_stores_and_store_files_no_kept_run_uses(tmp_path):
    storage = Storage(str(tmp_path))
    three_nights(storage)  # n3 kept: factors f-1, queries q-1, shards s-a and s-c
    root = storage.root

    def store(store_id, factors, names):
        storage.write_json(layout.store_key_file(root, store_id), {"factors": factors, "dim": 4})
        for url in [layout.store_basis(root, store_id)] + names:
            storage.write_bytes(url, b"s")
            commit_file(storage, url)

    keep = [layout.store_shard(root, "g-new", s) for s in ("s-a", "s-c")] + [layout.store_queries(root, "g-new", "q-1")]
    drop = [layout.store_shard(root, "g-new", "s-b"), layout.store_queries(root, "g-new", "q-old")]
    store("g-new", "f-1", keep + drop)
    store("g-old", "f-old", [layout.store_shard(root, "g-old", "s-a")])
    storage.write_bytes(layout.store_basis(root, "g-unknown"), b"s")  # no key.json: whose it is is unknown
    plan = plan_gc(storage, keep_last=1, keep_days=0)
    assert layout.store_dir(root, "g-old") in plan.folders and sorted(drop) == sorted(
        f for f in plan.files if "/store/" in f)
    apply_gc(storage, plan)
    assert not os.path.exists(layout.store_dir(root, "g-old"))
    for url in drop:
        assert not os.path.exists(url) and not os.path.exists(layout.file_marker(url))
    for url in keep + [layout.store_basis(root, "g-new"), layout.store_basis(root, "g-unknown")]:
        assert os.path.exists(url), url
    assert all(read_file_commit(storage, u) is not None for u in keep)


def test_gc_refuses_a_policy_that_would_delete_the_latest_run(tmp_path):
    storage = Storage(str(tmp_path))
    three_nights(storage)
    # A run started after n3 and still running takes keep_last=1's place: n3, latest.json's run, would go.
    catalog.write_entry(storage, row("n4", "2026-11-24T00:00:00+00:00", "running"))
    before = files_under(tmp_path)
    with pytest.raises(ConfigError, match="would delete run 'n3', which latest.json names") as e:
        plan_gc(storage, keep_last=1, keep_days=0)
    assert "\n" not in str(e.value)
    now = dt.datetime(2026, 11, 24, 12, tzinfo=dt.timezone.utc)
    with pytest.raises(ConfigError, match="latest.json"):
        plan_gc(storage, keep_last=0, keep_days=0.25, now=now)  # keeps runs from the last 6 hours only
    plan = plan_gc(storage, keep_last=0, keep_days=1.5, now=now)  # n3 and n4 kept; n4 running: shared objects kept
    assert plan.deleted_runs == ["n1", "n2"] and plan.files == [] and "running" in plan.note
    assert files_under(tmp_path) == before
    # Still "running" two days after its start: its driver died; it no longer protects anything.
    later = now + dt.timedelta(days=2)
    with pytest.raises(ConfigError, match="latest.json"):
        plan_gc(storage, keep_last=1, keep_days=0, now=later)  # n4 is the newest start: n3 would go
    plan = plan_gc(storage, keep_last=2, keep_days=0, now=later)
    assert plan.kept_runs == ["n3", "n4"] and plan.files and not plan.note
    with pytest.raises(ConfigError, match="gc.keep_last=N and/or gc.keep_days"):
        GcConfig(gc=GcOptions()).validate()


def test_gc_keeps_a_run_from_before_the_catalog_and_what_it_references(tmp_path):
    storage = Storage(str(tmp_path))
    three_nights(storage)
    root = storage.root
    storage.write_json(layout.run_manifest(root, "legacy"), {"run_id": "legacy", "factors_id": "f-old",
                                                             "queries_id": "q-old", "shards": ["s-a"]})
    plan = plan_gc(storage, keep_last=1, keep_days=0)
    assert plan.kept_runs == ["legacy", "n3"] and plan.deleted_runs == ["n1", "n2"]
    apply_gc(storage, plan)
    assert read_file_commit(storage, layout.factors_file(root, "f-old")) is not None
    assert read_file_commit(storage, layout.query_gradients(root, "q-old")) is not None
    assert os.path.exists(layout.run_manifest(root, "legacy"))


def test_parquet_objects_are_read_on_the_calling_thread(tmp_path, monkeypatch):
    """A failing job reads its catalog row and exits. ``pq.read_table`` releases its source on one of Arrow's
    threads, and released while the interpreter exited it aborted the process (a CI run: exit -6 instead of 3;
    a bare script, 18 of 40 runs). The catalog and ``Storage.read_parquet`` read through ``parquet_table``
    instead, on the calling thread."""
    from pipeline.storage import parquet_table

    table = pa.table({"status": ["failed"]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    assert parquet_table(sink.getvalue()).equals(table)
    storage = Storage(str(tmp_path))
    url = layout.catalog_entry(storage.root, "r")
    storage.write_parquet(url, table)

    def dataset_read(*args, **kwargs):
        raise AssertionError("pq.read_table releases its source on an Arrow thread")

    monkeypatch.setattr(pq, "read_table", dataset_read)
    assert catalog.read_entry(storage, "r") == {"status": "failed"}
    assert storage.read_parquet(url).equals(table)
