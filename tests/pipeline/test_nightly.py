"""Nightly re-scoring (issue 8): nights on a growing corpus, results and factors reused, history and latest.json.

Integration tier (a two-node local Ray cluster, one worker on each node; local storage; the small demo):

- night 1 on corpus A (two files); night 2 on A plus a new file B: only B's
  shard is scored, the factors are reused, and the table equals a from-scratch
  run on A+B with the same factors row for row; night 2 again scores nothing
  and leaves the table as it was; night 3 with a new checkpoint (a perturbed
  copy of the model) refits the factors and rescores every shard;
- a corpus file that vanished since the last night is reported and left out;
- latest.json is not moved back by an older run that merges last;
- gc in dry run deletes nothing; applied, every kept run's table is readable
  and a rerun of it skips every unit.

One test runs a night on the moto S3 server (re-uploading a file unchanged
keeps every shard id; the second night reuses every result).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import catalog, layout
from pipeline.config import (
    AttributeConfig,
    ClusterConfig,
    CorpusConfig,
    FactorsConfig,
    ModelConfig,
    QueriesConfig,
    RunConfig,
    ScoreConfig,
    StorageConfig,
)
from pipeline.storage import Storage
from tests.helpers import assert_identical_tables, read_table

pytestmark = pytest.mark.integration

DOCS_PER_SHARD = 16
A_ROWS, B_ROWS = 48, 16  # A: a.parquet (32 rows) + a.jsonl (16 rows); B: b.jsonl


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")


@pytest.fixture(scope="module")
def inputs(small_demo, tmp_path_factory):
    """Corpus A (a.parquet, c.jsonl), file B (b.jsonl, sorting between them), a perturbed checkpoint."""
    work = tmp_path_factory.mktemp("nightly")
    rows = pq.read_table(small_demo.corpus_path).select(["id", "text"]).slice(0, A_ROWS + B_ROWS)
    corpus = work / "corpus"
    corpus.mkdir()
    pq.write_table(rows.slice(0, 32), corpus / "a.parquet", row_group_size=8)
    _write_jsonl(str(corpus / "c.jsonl"), rows.slice(32, 16).to_pylist())
    b_file = work / "b.jsonl"
    _write_jsonl(str(b_file), rows.slice(A_ROWS, B_ROWS).to_pylist())
    model2 = work / "model2"
    shutil.copytree(small_demo.model_dir, model2)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model2 / "model.safetensors"))
    name = next(n for n in sorted(weights) if n.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + 1e-3 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(model2 / "model.safetensors"), metadata={"format": "pt"})
    return {"work": work, "corpus": str(corpus), "b": str(b_file), "model2": str(model2)}


def make_cfg(small_demo, inputs, root: str, run_id: str, model: str | None = None, **factors) -> AttributeConfig:
    return AttributeConfig(
        model=ModelConfig(path=model or small_demo.model_dir, cache_dir=str(inputs["work"] / "model-cache")),
        corpus=CorpusConfig(path=inputs["corpus"], docs_per_shard=DOCS_PER_SHARD, window=64),
        queries=QueriesConfig(path=small_demo.queries_path),
        storage=StorageConfig(root=root),
        run=RunConfig(id=run_id),
        factors=FactorsConfig(damping=1e-3, empirical_fisher=True, **factors),
        score=ScoreConfig(top_k=5),
        cluster=ClusterConfig(num_workers=2, cpus_per_worker=1, stall_timeout_s=120),  # one per node
    )


def run(cfg):
    """Run all stages; returns (manifest as stored, the context's counts of this invocation)."""
    from pipeline.run import run_stages

    ctx = run_stages(cfg)
    ctx.workers = []  # the actors' handles: dropped, so the next run's workers can be placed
    manifest = ctx.storage.read_json(layout.run_manifest(ctx.storage.root, cfg.run.id))
    return manifest, dict(ctx.counts), ctx.shards


def committed_units(root: str) -> dict[str, str]:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            if n.endswith(".commit.json") or n == "_COMMITTED.json":
                path = os.path.join(folder, n)
                out[os.path.relpath(path, root)] = json.load(open(path))["committed_at"]
    return out


@pytest.fixture(scope="module")
def two_nodes():
    from tests.helpers import multi_node_ray

    with multi_node_ray(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def nights(two_nodes, small_demo, inputs, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nights-root"))
    out = {"root": root}
    out["n1"] = run(make_cfg(small_demo, inputs, root, "night-1"))
    out["n1_table"] = read_table(out["n1"][0]["attribution"])
    shutil.copy(inputs["b"], os.path.join(inputs["corpus"], "b.jsonl"))  # B sorts between a.parquet and c.jsonl
    out["n2"] = run(make_cfg(small_demo, inputs, root, "night-2"))
    out["n2_table"] = read_table(out["n2"][0]["attribution"])
    out["before_again"] = committed_units(root)
    out["n2_again"] = run(make_cfg(small_demo, inputs, root, "night-2"))
    out["after_again"] = committed_units(root)
    out["n3"] = run(make_cfg(small_demo, inputs, root, "night-3", model=inputs["model2"]))
    return out


def test_night_two_scores_only_the_new_file_and_reuses_the_factors(nights):
    m1, c1, _ = nights["n1"]
    m2, c2, shards2 = nights["n2"]
    assert c1["shards_scored"] == m1["counts"]["num_shards"] == 3 and c1["shards_reused"] == 0
    assert m1["factors"]["decision"] == "fitted"
    assert m2["counts"]["num_shards"] == 4
    assert m2["counts"]["shards_scored"] == 1 and m2["counts"]["shards_reused"] == 3
    new = set(m2["shards"]) - set(m1["shards"])
    assert set(m1["shards"]) < set(m2["shards"]) and len(new) == 1  # inserting b.jsonl renamed no other shard
    assert [s.rel_path for s in shards2 if s.shard_id in new] == ["b.jsonl"]
    assert m2["factors_id"] == m1["factors_id"] and m2["factors"]["decision"] == "reused"
    assert m2["factors"]["fitted_share"] == pytest.approx(A_ROWS / (A_ROWS + B_ROWS))
    assert m2["queries_id"] == m1["queries_id"] and m2["results"]["key"] == m1["results"]["key"]
    assert m2["counts"]["files_added"] == 1 and m2["counts"]["files_vanished"] == 0
    # Per file: its shards, those scored by the run and those reused (night 2 scored b.jsonl's only).
    per_file = {p: (f["shards"], f["shards_scored"], f["shards_reused"]) for p, f in m2["corpus"]["files"].items()}
    assert per_file == {"a.parquet": (2, 0, 2), "b.jsonl": (1, 1, 0), "c.jsonl": (1, 0, 1)}
    assert {p: f["shards_scored"] for p, f in m1["corpus"]["files"].items()} == {"a.parquet": 2, "c.jsonl": 1}
    assert "shards_scored_per_file" not in m2["counts"]


def test_the_nights_ran_on_two_nodes(nights, two_nodes):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    assert len(nodes) == 2  # the head holds no CPU: each of the two workers sat on its own node


def test_night_two_equals_a_from_scratch_run_with_the_same_factors(nights, small_demo, inputs, tmp_path):
    root = str(tmp_path / "scratch")
    factors_id = nights["n2"][0]["factors_id"]
    # Only the factors (and their pin) travel: every shard is scored afresh.
    shutil.copytree(layout.factors_dir(nights["root"], factors_id), layout.factors_dir(root, factors_id))
    shutil.copytree(os.path.join(nights["root"], "factor_pins"), os.path.join(root, "factor_pins"))
    manifest, counts, _ = run(make_cfg(small_demo, inputs, root, "scratch"))
    assert manifest["factors_id"] == factors_id and counts["shards_scored"] == 4 and counts["shards_reused"] == 0
    assert_identical_tables(read_table(manifest["attribution"]), nights["n2_table"])
    for table in ("documents", "tokens", "layers"):
        got = pq.read_table(layout.run_table_part(root, "scratch", table)).drop(["run_id"])
        want = pq.read_table(layout.run_table_part(nights["root"], "night-2", table)).drop(["run_id"])
        assert got.to_pylist() == want.to_pylist(), table


def test_night_two_again_scores_nothing_and_writes_nothing(nights):
    _, counts, _ = nights["n2_again"]
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 4
    assert nights["after_again"] == nights["before_again"]
    assert_identical_tables(read_table(nights["n2_again"][0]["attribution"]), nights["n2_table"])


def test_night_three_with_a_new_checkpoint_recomputes_everything(nights):
    m2, m3 = nights["n2"][0], nights["n3"][0]
    assert m3["model"]["fingerprint"] != m2["model"]["fingerprint"]
    assert m3["factors"]["decision"] == "fitted" and m3["factors_id"] != m2["factors_id"]
    assert m3["queries_id"] != m2["queries_id"] and m3["results"]["key"] != m2["results"]["key"]
    assert m3["counts"]["shards_scored"] == 4 and m3["counts"]["shards_reused"] == 0


def test_the_catalog_lists_every_night_and_latest_names_the_newest(nights):
    storage = Storage(nights["root"])
    rows = {r["run_id"]: r for r in catalog.read_catalog(storage)}
    assert set(rows) == {"night-1", "night-2", "night-3"}
    assert all(r["status"] == "merged" for r in rows.values())
    assert rows["night-1"]["started_at"] < rows["night-2"]["started_at"] < rows["night-3"]["started_at"]
    assert rows["night-2"]["shards_scored"] == 1  # its rerun (night 2 again) wrote nothing
    assert rows["night-3"]["factors_decision"] == "fitted" and rows["night-3"]["num_shards"] == 4
    assert catalog.read_latest(storage)["run_id"] == "night-3"


def copy_root(nights, tmp_path) -> str:
    root = str(tmp_path / "root")
    shutil.copytree(nights["root"], root)
    return root


def test_a_file_vanished_since_last_night_is_reported_and_left_out(nights, small_demo, inputs, tmp_path, caplog):
    root = copy_root(nights, tmp_path)
    gone = os.path.join(inputs["corpus"], "c.jsonl")
    kept_aside = str(tmp_path / "c.jsonl")
    shutil.move(gone, kept_aside)
    try:
        caplog.set_level(logging.INFO, logger="pipeline")
        manifest, counts, _ = run(make_cfg(small_demo, inputs, root, "night-4", model=inputs["model2"]))
    finally:
        shutil.move(kept_aside, gone)
    assert counts["files_vanished"] == 1 and manifest["counts"]["vanished_files_sample"] == ["c.jsonl"]
    assert any("c.jsonl" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 3  # a.parquet's two shards and b.jsonl's
    assert manifest["factors"]["decision"] == "reused"
    c_docs = {json.loads(line)["id"] for line in open(gone)}
    assert not c_docs & set(read_table(manifest["attribution"]).column("doc_id").to_pylist())


def test_latest_is_not_moved_back_by_an_older_run_merging_last(nights, small_demo, inputs, tmp_path):
    from pipeline.run import run_stages

    root = copy_root(nights, tmp_path)
    older = make_cfg(small_demo, inputs, root, "older", model=inputs["model2"])
    run_stages(older, ("fit", "precondition", "score")).workers = []  # starts first, merges last
    run(make_cfg(small_demo, inputs, root, "newer", model=inputs["model2"]))
    storage = Storage(root)
    assert catalog.read_latest(storage)["run_id"] == "newer"
    run_stages(older, ("merge",)).workers = []
    rows = {r["run_id"]: r for r in catalog.read_catalog(storage)}
    assert rows["older"]["status"] == "merged" and rows["older"]["started_at"] < rows["newer"]["started_at"]
    assert catalog.read_latest(storage)["run_id"] == "newer"


def test_gc_keeps_every_kept_runs_table_and_their_reruns_skip_everything(nights, small_demo, inputs, tmp_path):
    from pipeline.gc import apply_gc, plan_gc

    root = copy_root(nights, tmp_path)
    storage = Storage(root)
    before = committed_units(root), sorted(p for p, _, _ in os.walk(root))
    plan = plan_gc(storage, keep_last=1, keep_days=0)
    assert plan.kept_runs == ["night-3"] and plan.deleted_runs == ["night-1", "night-2"]
    assert (committed_units(root), sorted(p for p, _, _ in os.walk(root))) == before  # the dry run deleted nothing
    m2 = nights["n2"][0]
    assert layout.factors_dir(root, m2["factors_id"]) in plan.folders
    assert layout.results_dir(root, m2["results"]["key"]) in plan.folders
    apply_gc(storage, plan)
    assert not os.path.exists(layout.run_dir(root, "night-1"))
    assert not os.path.exists(layout.results_dir(root, m2["results"]["key"]))
    table = read_table(layout.attribution_dir(root, "night-3"))
    assert_identical_tables(table, read_table(nights["n3"][0]["attribution"]))
    units = committed_units(root)
    manifest, counts, _ = run(make_cfg(small_demo, inputs, root, "night-3", model=inputs["model2"]))
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 4
    assert committed_units(root) == units  # nothing fitted, preconditioned, scored or merged again
    assert manifest["factors"]["decision"] == "fitted"  # the manifest of night 3's own (first) run, unchanged


def run_job(tmp_path, job: str, *overrides: str):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(repo / "jobs" / job), f"hydra.run.dir={tmp_path / 'hydra'}", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HYDRA_FULL_ERROR="0"))


def test_the_diff_and_gc_jobs(nights, tmp_path):
    root = copy_root(nights, tmp_path)
    proc = run_job(tmp_path, "diff.py", f"storage.root={root}", "diff.run_a=night-2", "diff.run_b=night-3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("night-2 -> night-3: ") and "entered" in first
    assert os.path.exists(layout.run_diff(root, "night-2", "night-3"))

    before = committed_units(root)
    proc = run_job(tmp_path, "gc.py", f"storage.root={root}", "gc.keep_last=2")
    assert proc.returncode == 0 and "would delete" in proc.stdout and "night-1" in proc.stdout, proc.stderr
    proc = run_job(tmp_path, "gc.py", f"storage.root={root}", "gc.keep_days=0.00001", "gc.apply=true")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and "latest.json" in lines[-1] and "Traceback" not in proc.stderr, lines
    assert committed_units(root) == before  # refused: nothing deleted


def test_shard_ids_on_s3_equal_the_local_ones_and_survive_a_reupload(inputs, s3_env, tmp_path):
    import s3fs

    from pipeline.corpus import list_corpus, make_shards

    s3 = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = s3_env[len("s3://"):]
    files = {"a.parquet": os.path.join(inputs["corpus"], "a.parquet"), "b.jsonl": inputs["b"],
             "c.jsonl": os.path.join(inputs["corpus"], "c.jsonl")}
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    for name, path in files.items():
        shutil.copy(path, local_dir / name)
        s3.put_file(path, f"{bucket}/corpus/{name}")

    def ids(path):
        return [(s.shard_id, s.rel_path) for s in make_shards(list_corpus(path, "id", "text"), DOCS_PER_SHARD)]

    local, remote = ids(str(local_dir)), ids(f"{s3_env}/corpus/")
    assert remote == local and len(local) == 4
    s3.rm_file(f"{bucket}/corpus/b.jsonl")
    s3.put_file(files["b.jsonl"], f"{bucket}/corpus/b.jsonl")  # re-uploaded unchanged: a new ETag date, same bytes
    assert ids(f"{s3_env}/corpus/") == local


def test_two_nights_on_s3_score_only_the_new_file(nights, small_demo, inputs, s3_server, s3_env):
    """Corpus and storage on the S3 server: a re-uploaded unchanged file and the old files are reused."""
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = s3_env[len("s3://"):]
    for name in ("a.parquet", "c.jsonl"):
        s3.put_file(os.path.join(inputs["corpus"], name), f"{bucket}/corpus/{name}")
    # The workers get the endpoint and test credentials as storage options (Ray started before this test).
    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}

    def cfg(run_id):
        local = make_cfg(small_demo, inputs, f"{s3_env}/attribution", run_id)
        return replace(local, corpus=replace(local.corpus, path=f"{s3_env}/corpus/"),
                       storage=replace(local.storage, options=options))

    m1, c1, _ = run(cfg("s3-night-1"))
    assert c1["shards_scored"] == 3 and m1["factors"]["decision"] == "fitted"
    s3.put_file(inputs["b"], f"{bucket}/corpus/b.jsonl")
    s3.rm_file(f"{bucket}/corpus/a.parquet")
    s3.put_file(os.path.join(inputs["corpus"], "a.parquet"), f"{bucket}/corpus/a.parquet")  # re-uploaded unchanged
    m2, c2, _ = run(cfg("s3-night-2"))
    assert c2["shards_scored"] == 1 and c2["shards_reused"] == 3 and m2["factors"]["decision"] == "reused"
    assert set(m1["shards"]) < set(m2["shards"]) and m2["shards"] == nights["n2"][0]["shards"]
    # The same inputs on S3 and on a local root: the same table, row for row.
    table = read_table(m2["attribution"], filesystem=s3fs.S3FileSystem(**{"endpoint_url": s3_server}))
    assert_identical_tables(table, nights["n2_table"])
    assert catalog.read_latest(Storage(f"{s3_env}/attribution", options))["run_id"] == "s3-night-2"
