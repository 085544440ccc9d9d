"""Nightly re-scoring (issue 8): nights on a growing corpus, results and factors reused, history and latest.json.

Integration tier. The night sequence runs on a two-node local Ray cluster (one
worker on each node) against the moto S3 server on loopback: the corpus files
and ``storage.root`` are objects in a bucket of this module's own; the model
and the queries are local files (the small demo). Neither the driver's nor the
workers' environment points at the server: the pipeline reaches it only
through ``storage.options`` (endpoint and test credentials), as a cluster whose
workers started before the job would.

- night 1 on corpus A (two files); then B is uploaded and a.parquet re-uploaded
  unchanged; night 2 on A plus B: only B's shard is scored (a.parquet keeps its
  shard ids), the factors are reused, and the table equals a from-scratch run
  on A+B with the same factors row for row (that run reads a local copy of the
  same files: an S3 corpus and a local one give the same shards and table);
  night 2 again scores nothing and leaves the table as it was; night 3 with a
  new checkpoint (a perturbed copy of the model) refits the factors and
  rescores every shard;
- a corpus object deleted since the last night is reported and left out;
- latest.json is not moved back by an older run that merges last;
- gc in dry run deletes nothing; applied, every kept run's table is readable
  and a rerun of it skips every unit;
- the diff and gc jobs run as subprocesses on the S3 root, their endpoint and
  credentials from the standard AWS variables.

The tests after the sequence each work on a server-side copy of its root under
a fresh prefix. One more test, without Ray, checks that shard ids listed on S3
equal the local ones and survive a re-upload.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass

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
from tests.helpers import assert_identical_tables, aws_env_vars, read_table

pytestmark = pytest.mark.integration

DOCS_PER_SHARD = 16
A_ROWS, B_ROWS = 48, 16  # A: a.parquet (32 rows) + c.jsonl (16 rows); B: b.jsonl
CREDENTIALS = {"key": "testing", "secret": "testing"}  # moto accepts any


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")


@pytest.fixture(scope="module")
def inputs(small_demo, tmp_path_factory):
    """Local files: corpus A (a.parquet, c.jsonl), B (b.jsonl, sorting between them), a perturbed checkpoint."""
    work = tmp_path_factory.mktemp("nightly")
    rows = pq.read_table(small_demo.corpus_path).select(["id", "text"]).slice(0, A_ROWS + B_ROWS)
    files = work / "files"
    files.mkdir()
    pq.write_table(rows.slice(0, 32), files / "a.parquet", row_group_size=8)
    _write_jsonl(str(files / "c.jsonl"), rows.slice(32, 16).to_pylist())
    _write_jsonl(str(files / "b.jsonl"), rows.slice(A_ROWS, B_ROWS).to_pylist())
    model2 = work / "model2"
    shutil.copytree(small_demo.model_dir, model2)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model2 / "model.safetensors"))
    name = next(n for n in sorted(weights) if n.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + 1e-3 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(model2 / "model.safetensors"), metadata={"format": "pt"})
    return {"work": work, "files": {n: str(files / n) for n in ("a.parquet", "b.jsonl", "c.jsonl")},
            "model2": str(model2)}


@dataclass(frozen=True)
class Bucket:
    """This module's bucket on the moto server; ``fs`` is the test's own client (no listings cache)."""

    endpoint: str
    url: str  # s3://{bucket}
    fs: object  # s3fs.S3FileSystem

    @property
    def options(self) -> dict:
        """The pipeline's ``storage.options``: the endpoint and the test credentials."""
        return {"endpoint_url": self.endpoint, **CREDENTIALS}

    @property
    def corpus(self) -> str:
        return f"{self.url}/corpus/"

    def fresh_prefix(self, name: str) -> str:
        return f"{self.url}/{name}-{uuid.uuid4().hex[:8]}"

    def upload(self, local: str, name: str) -> None:
        """Upload a local file as ``corpus/{name}``."""
        self.fs.put_file(local, _path(self.corpus + name))


def _path(url: str) -> str:
    return url.removeprefix("s3://").rstrip("/")


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """A fresh bucket; for the module, no AWS variable is set (the pipeline must use ``storage.options``).

    Set up before the Ray cluster, so its workers inherit that environment: a
    developer's profile, region or ``~/.aws`` files never reach them either.
    """
    import s3fs

    scratch = str(tmp_path_factory.mktemp("aws"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in aws_env_vars(s3_server, scratch).items():
            if name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
                mp.setenv(name, value)  # files that do not exist
            else:
                mp.delenv(name, raising=False)
        fs = s3fs.S3FileSystem(endpoint_url=s3_server, **CREDENTIALS, skip_instance_cache=True,
                               use_listings_cache=False)
        bucket_name = f"nightly-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket_name)
        yield Bucket(s3_server, f"s3://{bucket_name}", fs)


def make_cfg(small_demo, inputs, bucket: Bucket, root: str, run_id: str, model: str | None = None,
             corpus: str | None = None) -> AttributeConfig:
    return AttributeConfig(
        model=ModelConfig(path=model or small_demo.model_dir, cache_dir=str(inputs["work"] / "model-cache")),
        corpus=CorpusConfig(path=corpus or bucket.corpus, docs_per_shard=DOCS_PER_SHARD, window=64),
        queries=QueriesConfig(path=small_demo.queries_path),
        # No environment variable names the server: the endpoint and credentials travel with the config.
        storage=StorageConfig(root=root, options=bucket.options),
        run=RunConfig(id=run_id),
        factors=FactorsConfig(damping=1e-3, empirical_fisher=True),
        score=ScoreConfig(top_k=5),
        cluster=ClusterConfig(num_workers=2, cpus_per_worker=1, stall_timeout_s=120,  # one per node
                              reuse_workers=True),
    )


def run(cfg):
    """Run all stages; returns (manifest as stored, the context's counts of this invocation, the shards)."""
    from pipeline.run import run_stages

    ctx = run_stages(cfg)
    ctx.workers = []  # the actors' handles: dropped, so the next run's workers can be placed
    manifest = ctx.storage.read_json(layout.run_manifest(ctx.storage.root, cfg.run.id))
    return manifest, dict(ctx.counts), ctx.shards


def table(bucket: Bucket, url: str):
    return read_table(url, filesystem=bucket.fs)


def committed_units(bucket: Bucket, root: str) -> dict[str, str]:
    """``{path under root: committed_at}`` of every commit marker under ``root``."""
    base = _path(root)
    markers = [p for p in bucket.fs.find(base) if p.endswith(".commit.json") or p.endswith("/_COMMITTED.json")]
    return {p[len(base) + 1 :]: json.loads(data)["committed_at"] for p, data in bucket.fs.cat(markers).items()}


def stored_objects(bucket: Bucket, root: str) -> dict[str, tuple]:
    """``{path under root: (size, ETag, LastModified)}`` of every object under ``root``."""
    base = _path(root)
    found = bucket.fs.find(base, detail=True)
    return {p[len(base) + 1 :]: (e["size"], e["ETag"], e["LastModified"]) for p, e in found.items()}


def copy_prefix(bucket: Bucket, src: str, dst: str) -> None:
    """Server-side copy of every object under ``src`` to the same relative path under ``dst``."""
    src, dst = _path(src), _path(dst)
    for p in bucket.fs.find(src):
        bucket.fs.copy(p, dst + p[len(src) :])


@pytest.fixture(scope="module")
def two_nodes(bucket):
    from tests.helpers import multi_node_ray

    with multi_node_ray(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def nights(two_nodes, small_demo, inputs, bucket):
    root = f"{bucket.url}/nights"
    out = {"root": root}
    for name in ("a.parquet", "c.jsonl"):
        bucket.upload(inputs["files"][name], name)
    out["n1"] = run(make_cfg(small_demo, inputs, bucket, root, "night-1"))
    out["n1_table"] = table(bucket, out["n1"][0]["attribution"])
    bucket.upload(inputs["files"]["b.jsonl"], "b.jsonl")  # B sorts between a.parquet and c.jsonl
    a = _path(bucket.corpus + "a.parquet")
    before = bucket.fs.info(a)
    bucket.fs.rm_file(a)
    bucket.upload(inputs["files"]["a.parquet"], "a.parquet")  # re-uploaded unchanged: a new object, the same bytes
    out["a_reuploaded"] = before, bucket.fs.info(a)
    out["n2"] = run(make_cfg(small_demo, inputs, bucket, root, "night-2"))
    out["n2_table"] = table(bucket, out["n2"][0]["attribution"])
    out["before_again"] = committed_units(bucket, root)
    out["n2_again"] = run(make_cfg(small_demo, inputs, bucket, root, "night-2"))
    out["after_again"] = committed_units(bucket, root)
    out["n3"] = run(make_cfg(small_demo, inputs, bucket, root, "night-3", model=inputs["model2"]))
    return out


def test_night_two_scores_only_the_new_file_and_reuses_the_factors(nights):
    m1, c1, _ = nights["n1"]
    m2, c2, shards2 = nights["n2"]
    assert c1["shards_scored"] == m1["counts"]["num_shards"] == 3 and c1["shards_reused"] == 0
    assert m1["factors"]["decision"] == "fitted"
    assert m2["counts"]["num_shards"] == 4
    assert m2["counts"]["shards_scored"] == 1 and m2["counts"]["shards_reused"] == 3
    assert c2["shards_scored"] == 1 and c2["shards_reused"] == 3
    new = set(m2["shards"]) - set(m1["shards"])
    assert set(m1["shards"]) < set(m2["shards"]) and len(new) == 1  # inserting b.jsonl renamed no other shard
    assert [s.rel_path for s in shards2 if s.shard_id in new] == ["b.jsonl"]
    # a.parquet was deleted and uploaded again between the nights (same bytes): its shards were reused all the same.
    before, after = nights["a_reuploaded"]
    assert after["LastModified"] > before["LastModified"]
    assert (after["size"], after["ETag"]) == (before["size"], before["ETag"])
    assert m2["factors_id"] == m1["factors_id"] and m2["factors"]["decision"] == "reused"
    assert m2["factors"]["fitted_share"] == pytest.approx(A_ROWS / (A_ROWS + B_ROWS))
    assert m2["queries_id"] == m1["queries_id"] and m2["results"]["key"] == m1["results"]["key"]
    assert m2["counts"]["files_added"] == 1 and m2["counts"]["files_vanished"] == 0
    # Per file: its shards, those scored by the run and those reused (night 2 scored b.jsonl's only).
    per_file = {p: (f["shards"], f["shards_scored"], f["shards_reused"]) for p, f in m2["corpus"]["files"].items()}
    assert per_file == {"a.parquet": (2, 0, 2), "b.jsonl": (1, 1, 0), "c.jsonl": (1, 0, 1)}
    assert {p: f["shards_scored"] for p, f in m1["corpus"]["files"].items()} == {"a.parquet": 2, "c.jsonl": 1}
    assert "shards_scored_per_file" not in m2["counts"]


def test_the_nights_ran_on_two_nodes_against_s3(nights, two_nodes):
    import ray

    from pipeline.cluster import release_workers

    release_workers()  # the nights' kept workers hold both CPUs; the task below needs one
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    assert len(nodes) == 2  # the head holds no CPU: each of the two workers sat on its own node

    @ray.remote(num_cpus=1)
    def aws_variables() -> list[str]:
        return sorted(k for k in os.environ if k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))

    assert ray.get(aws_variables.remote()) == []  # what reached S3 from a worker came through storage.options
    for manifest, _, shards in (nights["n1"], nights["n2"], nights["n3"]):
        assert manifest["attribution"].startswith(nights["root"] + "/")
        assert all(s.file_url.startswith("s3://") for s in shards)


def test_night_two_equals_a_from_scratch_run_with_the_same_factors(nights, small_demo, inputs, bucket, tmp_path):
    root = bucket.fresh_prefix("scratch")
    m2 = nights["n2"][0]
    factors_id = m2["factors_id"]
    # Only the factors (and their pin) travel: every shard is scored afresh.
    copy_prefix(bucket, layout.factors_dir(nights["root"], factors_id), layout.factors_dir(root, factors_id))
    copy_prefix(bucket, layout.url(nights["root"], "factor_pins"), layout.url(root, "factor_pins"))
    # The same files as a local corpus: the shards and the table must not depend on where the corpus lives.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, path in inputs["files"].items():
        shutil.copy(path, corpus / name)
    manifest, counts, _ = run(make_cfg(small_demo, inputs, bucket, root, "scratch", corpus=str(corpus)))
    assert manifest["factors_id"] == factors_id and counts["shards_scored"] == 4 and counts["shards_reused"] == 0
    assert manifest["shards"] == m2["shards"]
    assert_identical_tables(table(bucket, manifest["attribution"]), nights["n2_table"])
    for name in ("documents", "tokens", "layers"):
        got = pq.read_table(_path(layout.run_table_part(root, "scratch", name)), filesystem=bucket.fs)
        want = pq.read_table(_path(layout.run_table_part(nights["root"], "night-2", name)), filesystem=bucket.fs)
        assert got.drop(["run_id"]).to_pylist() == want.drop(["run_id"]).to_pylist(), name


def test_night_two_again_scores_nothing_and_writes_nothing(nights, bucket):
    _, counts, _ = nights["n2_again"]
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 4
    assert nights["after_again"] == nights["before_again"]
    assert_identical_tables(table(bucket, nights["n2_again"][0]["attribution"]), nights["n2_table"])


def test_night_three_with_a_new_checkpoint_recomputes_everything(nights):
    m2, m3 = nights["n2"][0], nights["n3"][0]
    assert m3["model"]["fingerprint"] != m2["model"]["fingerprint"]
    assert m3["factors"]["decision"] == "fitted" and m3["factors_id"] != m2["factors_id"]
    assert m3["queries_id"] != m2["queries_id"] and m3["results"]["key"] != m2["results"]["key"]
    assert m3["counts"]["shards_scored"] == 4 and m3["counts"]["shards_reused"] == 0


def test_the_catalog_lists_every_night_and_latest_names_the_newest(nights, bucket):
    storage = Storage(nights["root"], bucket.options)
    rows = {r["run_id"]: r for r in catalog.read_catalog(storage)}
    assert set(rows) == {"night-1", "night-2", "night-3"}
    assert all(r["status"] == "merged" for r in rows.values())
    assert rows["night-1"]["started_at"] < rows["night-2"]["started_at"] < rows["night-3"]["started_at"]
    assert rows["night-2"]["shards_scored"] == 1  # its rerun (night 2 again) wrote nothing
    assert rows["night-3"]["factors_decision"] == "fitted" and rows["night-3"]["num_shards"] == 4
    assert catalog.read_latest(storage)["run_id"] == "night-3"


def copy_root(nights, bucket: Bucket) -> str:
    root = bucket.fresh_prefix("root")
    copy_prefix(bucket, nights["root"], root)
    return root


def test_a_file_vanished_since_last_night_is_reported_and_left_out(nights, small_demo, inputs, bucket, caplog):
    root = copy_root(nights, bucket)
    gone = _path(bucket.corpus + "c.jsonl")
    kept_aside = _path(bucket.fresh_prefix("aside"))
    bucket.fs.mv(gone, kept_aside)
    try:
        caplog.set_level(logging.INFO, logger="pipeline")
        manifest, counts, _ = run(make_cfg(small_demo, inputs, bucket, root, "night-4", model=inputs["model2"]))
    finally:
        bucket.fs.mv(kept_aside, gone)
    assert counts["files_vanished"] == 1 and manifest["counts"]["vanished_files_sample"] == ["c.jsonl"]
    assert any("c.jsonl" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 3  # a.parquet's two shards and b.jsonl's
    assert manifest["factors"]["decision"] == "reused"
    c_docs = {json.loads(line)["id"] for line in bucket.fs.cat_file(gone).decode().splitlines()}
    assert len(c_docs) == 16
    assert not c_docs & set(table(bucket, manifest["attribution"]).column("doc_id").to_pylist())


def test_latest_is_not_moved_back_by_an_older_run_merging_last(nights, small_demo, inputs, bucket):
    from pipeline.run import run_stages

    root = copy_root(nights, bucket)
    older = make_cfg(small_demo, inputs, bucket, root, "older", model=inputs["model2"])
    run_stages(older, ("fit", "precondition", "score")).workers = []  # starts first, merges last
    run(make_cfg(small_demo, inputs, bucket, root, "newer", model=inputs["model2"]))
    storage = Storage(root, bucket.options)
    assert catalog.read_latest(storage)["run_id"] == "newer"
    run_stages(older, ("merge",)).workers = []
    rows = {r["run_id"]: r for r in catalog.read_catalog(storage)}
    assert rows["older"]["status"] == "merged" and rows["older"]["started_at"] < rows["newer"]["started_at"]
    assert catalog.read_latest(storage)["run_id"] == "newer"


def test_gc_keeps_every_kept_runs_table_and_their_reruns_skip_everything(nights, small_demo, inputs, bucket):
    from pipeline.gc import apply_gc, plan_gc

    root = copy_root(nights, bucket)
    storage = Storage(root, bucket.options)
    before = stored_objects(bucket, root)
    plan = plan_gc(storage, keep_last=1, keep_days=0)
    assert plan.kept_runs == ["night-3"] and plan.deleted_runs == ["night-1", "night-2"]
    assert stored_objects(bucket, root) == before  # the dry run deleted (and wrote) nothing
    m2 = nights["n2"][0]
    assert layout.factors_dir(root, m2["factors_id"]) in plan.folders
    assert layout.results_dir(root, m2["results"]["key"]) in plan.folders
    apply_gc(storage, plan)
    assert not bucket.fs.find(_path(layout.run_dir(root, "night-1")))
    assert not bucket.fs.find(_path(layout.results_dir(root, m2["results"]["key"])))
    assert_identical_tables(table(bucket, layout.attribution_dir(root, "night-3")),
                            table(bucket, nights["n3"][0]["attribution"]))
    units = committed_units(bucket, root)
    manifest, counts, _ = run(make_cfg(small_demo, inputs, bucket, root, "night-3", model=inputs["model2"]))
    assert counts["shards_scored"] == 0 and counts["shards_reused"] == 4
    assert committed_units(bucket, root) == units  # nothing fitted, preconditioned, scored or merged again
    assert manifest["factors"]["decision"] == "fitted"  # the manifest of night 3's own (first) run, unchanged


def run_job(tmp_path, bucket: Bucket, job: str, *overrides: str):
    """``jobs/{job}`` in a subprocess; it finds the server through the standard AWS variables."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    for name, value in aws_env_vars(bucket.endpoint, str(tmp_path)).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(repo / "jobs" / job), f"hydra.run.dir={tmp_path / 'hydra'}",
                           "storage=s3", *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_the_diff_and_gc_jobs(nights, bucket, tmp_path):
    root = copy_root(nights, bucket)
    proc = run_job(tmp_path, bucket, "diff.py", f"storage.root={root}", "diff.run_a=night-2", "diff.run_b=night-3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The summary comes first: the storage libraries' INFO lines (botocore: where it found the credentials)
    # are quieted by the jobs (pipeline.jobs_common.quiet_libraries), so nothing comes before it.
    first = proc.stdout.splitlines()[0]
    assert first.startswith("night-2 -> night-3: ") and "entered" in first, proc.stdout
    assert not any("aiobotocore" in line or "botocore" in line for line in proc.stdout.splitlines())
    assert bucket.fs.exists(_path(layout.run_diff(root, "night-2", "night-3")))

    before = stored_objects(bucket, root)
    proc = run_job(tmp_path, bucket, "gc.py", f"storage.root={root}", "gc.keep_last=2")
    assert proc.returncode == 0 and "would delete" in proc.stdout and "night-1" in proc.stdout, proc.stderr
    proc = run_job(tmp_path, bucket, "gc.py", f"storage.root={root}", "gc.keep_days=0.00001", "gc.apply=true")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and "latest.json" in lines[-1] and "Traceback" not in proc.stderr, lines
    assert stored_objects(bucket, root) == before  # dry run, then refused: nothing deleted or written


def test_shard_ids_on_s3_equal_the_local_ones_and_survive_a_reupload(inputs, s3_env, tmp_path):
    import s3fs

    from pipeline.corpus import list_corpus, make_shards

    s3 = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = s3_env[len("s3://"):]
    files = inputs["files"]
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
