"""The whole chain on real engines: a multi-node Ray cluster, an S3 server on loopback, real Parquet.

One small planted-facts demo (tiny GPT-2) is built for the module and uploaded
to a bucket of the moto S3 server; every run reads model, corpus and queries
from ``s3://`` and writes there. The cluster is ``ray.cluster_utils.Cluster``:
a head with no CPUs and two worker nodes with one CPU each. The pipeline
itself connects to it (``cluster.address``) and disconnects after each run.

Checked: the ranked table equals a one-process computation with the numeric
core alone; it is readable with pyarrow and DuckDB with the columns and types
of docs/design.md#storage; a rerun skips every unit and writes nothing; a worker
killed between writing a shard and committing it loses and duplicates nothing;
``run.overwrite`` recomputes to the same table; merge refuses an uncommitted
shard and shards scored with another ``score.top_k``; the planted documents come out as the top proponents of the
facts; and ``factors.lambda_max_documents`` fits Lambda on the capped shards only.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import json
import logging
import os
import time
import uuid
import pytest
import torch

from pipeline.config import (
    AttributeConfig,
    ClusterConfig,
    CorpusConfig,
    FactorsConfig,
    ModelConfig,
    ProjectionConfig,
    QueriesConfig,
    RunConfig,
    ScoreConfig,
    StorageConfig,
)
from pipeline.core.ekfac import EKFACFactors
from pipeline.corpus import fit_units, unit_key
from pipeline.errors import MergeRefusedError
from pipeline.worker import KILL_ENV
from tests.helpers import (
    DUCKDB_TYPES,
    SCORE_RTOL,
    assert_identical_tables,
    assert_same_ranking,
    aws_env_vars,
    check_table_schema,
    demo_recall,
    patched_environ,
    read_queries_file,
    read_table,
    read_table_duckdb,
    reference_factors,
    reference_table,
    scratch_env,
    shutdown_ray,
    sorted_rows,
    split_corpus,
)

pytestmark = pytest.mark.integration

DOCS_PER_SHARD = 16
FIRST_FILE_ROWS = 60  # part-00000.parquet; the rest goes to part-00001.jsonl
DAMPING = 1e-3
KILL_SHARD = 2


# ---- module fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(s3_server):
    """Scratch HOME/RAY_TMPDIR, AWS variables for the test server, and the (disarmed) kill hook.

    The kill hook's variable is set before any Ray process starts, so every
    node and worker inherits it; it stays disarmed while its marker file
    exists, and the worker-death test arms it by deleting the marker.
    """
    with scratch_env() as scratch:
        marker = os.path.join(scratch, "kill-marker")
        open(marker, "w").close()
        with patched_environ(**aws_env_vars(s3_server, scratch), **{KILL_ENV: f"{KILL_SHARD}:{marker}"}):
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            yield {"scratch": scratch, "marker": marker}
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def cluster(env):
    from ray.cluster_utils import Cluster

    shutdown_ray()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        shutdown_ray()
        c.shutdown()


@pytest.fixture(scope="module")
def s3(env):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture(scope="module")
def inputs(env, s3, small_demo, tmp_path_factory):
    """The demo uploaded to a fresh bucket: model folder, corpus in two files, queries."""
    bucket = f"pipe-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    split = split_corpus(small_demo.corpus_path, str(tmp_path_factory.mktemp("corpus")), FIRST_FILE_ROWS)
    s3.put(small_demo.model_dir + "/", f"{bucket}/models/demo/", recursive=True)
    for p in split.paths:
        s3.put_file(p, f"{bucket}/corpus/{os.path.basename(p)}")
    s3.put_file(small_demo.queries_path, f"{bucket}/queries/queries.jsonl")
    assert s3.exists(f"{bucket}/models/demo/config.json")
    return {
        "bucket": bucket,
        "root": f"s3://{bucket}/attribution",
        "split": split,
        "queries": read_queries_file(small_demo.queries_path),
        "facts": json.loads(open(small_demo.facts_path).read()),
        "model_dir": small_demo.model_dir,
        "model_cache": str(tmp_path_factory.mktemp("model-cache")),
    }


def make_cfg(inputs, cluster, run_id: str, dim: int | None = None, overwrite: bool = False,
             query_rank: int | None = None) -> AttributeConfig:
    b = inputs["bucket"]
    return AttributeConfig(
        model=ModelConfig(path=f"s3://{b}/models/demo", cache_dir=inputs["model_cache"]),
        # The demo model's training window (unset, the window would be its context, 128).
        corpus=CorpusConfig(path=f"s3://{b}/corpus/", docs_per_shard=DOCS_PER_SHARD, window=64),
        queries=QueriesConfig(path=f"s3://{b}/queries/queries.jsonl"),
        storage=StorageConfig(root=inputs["root"]),
        run=RunConfig(id=run_id, overwrite=overwrite),
        # float64 bases: float32 ones (the default) of sums added in another order (per shard, then across
        # shards, against all at once in one process) moved scores by up to 1.9e-4 of the query's largest.
        factors=FactorsConfig(damping=DAMPING, empirical_fisher=True, eigh_dtype="float64"),
        projection=ProjectionConfig() if dim is None else ProjectionConfig(dim=dim),
        # float32 scoring products: with bfloat16 (the default) a product's input near a rounding boundary in
        # one process and not in the other moves a score by up to 4e-3 of it, above the comparisons' 1e-4.
        score=ScoreConfig(product_dtype="float32", **({} if query_rank is None else {"query_rank": query_rank})),
        cluster=ClusterConfig(address=cluster.address, num_workers=2, cpus_per_worker=0.5),
    )


def run(cfg: AttributeConfig) -> dict:
    from pipeline.run import run_attribution

    started = time.perf_counter()
    manifest = run_attribution(cfg)
    print(f"run {cfg.run.id}: {time.perf_counter() - started:.1f}s, timings {manifest['timings']}")
    return manifest


def objects(s3, prefix: str) -> dict:
    """Every object under ``prefix``: (ETag, LastModified, size); the write probe's folder left out."""
    found = s3.find(prefix, detail=True)
    return {
        k: (v.get("ETag"), str(v.get("LastModified")), v.get("size"))
        for k, v in found.items()
        if "/_probe/" not in k
    }


def table_of(s3, manifest):
    return read_table(manifest["attribution"], filesystem=s3)


@pytest.fixture(scope="module")
def baseline(cluster, inputs, s3):
    cfg = make_cfg(inputs, cluster, "baseline")
    manifest = run(cfg)
    return {"cfg": cfg, "manifest": manifest, "table": table_of(s3, manifest)}


@pytest.fixture(scope="module")
def reference(baseline, inputs):
    """The baseline's (full-size) factors fitted by the core alone, in this process."""
    started = time.perf_counter()
    factors = reference_factors(baseline["cfg"], inputs["model_dir"], inputs["split"].files)
    print(f"single-process reference fit: {time.perf_counter() - started:.1f}s")
    return {"factors": factors}


# ---- tests ------------------------------------------------------------------------------------


def test_full_chain_on_cluster_equals_single_process_core(baseline, inputs, s3):
    manifest, table = baseline["manifest"], baseline["table"]
    split = inputs["split"]

    # Several shards over two files of two formats, all on S3.
    assert manifest["counts"]["num_shards"] >= 4
    assert manifest["counts"]["num_files"] == 2 and manifest["counts"]["num_docs"] == split.num_docs
    assert manifest["attribution"] == f"{inputs['root']}/runs/baseline/attribution"

    check_table_schema(table)
    # The core scores with the pipeline's factors. The default's low-rank queries come from a seeded randomized
    # range finder in the factors' eigenbasis, and the same sums added in another order (per fit unit, then
    # across units, against all at once here) give bases that differ by float32 rounding: enough to move the
    # range finder's rank-24 result, and a score by up to about 1e-3 of itself. The fit itself is checked
    # against the core's through dense queries (test_projection_off_equals_single_process_core).
    factors = EKFACFactors.from_bytes(
        s3.cat_file(f"{inputs['bucket']}/attribution/factors/{manifest['factors_id']}/factors.safetensors"),
        torch.float32)
    want, _ = reference_table(baseline["cfg"], inputs["model_dir"], split.files, inputs["queries"], factors)
    print(f"pipeline vs core (default projection {ProjectionConfig()}):", assert_same_ranking(table, want, SCORE_RTOL))
    assert table.num_rows == want.num_rows

    # The same rows through DuckDB over a pyarrow dataset opened through s3fs.
    rows, types = read_table_duckdb(manifest["attribution"], filesystem=s3)
    assert types == DUCKDB_TYPES
    assert [dict(zip(DUCKDB_TYPES, r)) for r in rows] == sorted_rows(table)

    # Provenance beside the table.
    stored = json.loads(s3.cat_file(f"{inputs['bucket']}/attribution/runs/baseline/manifest.json"))
    assert stored == manifest
    for key in ("run_id", "model", "factors_id", "queries_id", "corpus", "queries", "config", "counts", "timings", "shards"):
        assert key in manifest, key
    assert manifest["model"]["fingerprint"] and manifest["corpus"]["fingerprint"] and manifest["queries"]["fingerprint"]
    assert manifest["config"]["factors"]["damping"] == DAMPING and manifest["config"]["projection"] == asdict(ProjectionConfig())
    assert manifest["counts"]["num_windows"] > manifest["counts"]["num_docs"]  # long documents were windowed
    assert s3.exists(f"{inputs['bucket']}/attribution/runs/baseline/attribution/_COMMITTED.json")
    assert len(manifest["shards"]) == manifest["counts"]["num_shards"]
    assert manifest["counts"]["scoring_products"] == ["float32"]  # score.product_dtype=float32, recorded per shard
    # The queries were preconditioned in two slices (one per worker), then joined in order (the equality above).
    parts = s3.ls(f"{inputs['bucket']}/attribution/queries/{manifest['queries_id']}/parts")
    assert sorted(p.rsplit("/", 1)[1] for p in parts if not p.endswith(".commit.json")) == [
        "0000-of-0002.safetensors", "0001-of-0002.safetensors"]


def test_projection_off_equals_single_process_core(cluster, inputs, s3, reference):
    cfg = make_cfg(inputs, cluster, "plain-ekfac", dim=0, query_rank=0)  # exact: dense query gradients
    manifest = run(cfg)
    # Full-size factors are shared with the baseline when it fitted full-size ones (the default, projection
    # off, or sketch mode); curvature mode fits in the projected space, so these would be new.
    baseline_factors = json.loads(s3.cat_file(f"{inputs['bucket']}/attribution/runs/baseline/manifest.json"))["factors_id"]
    shared = ProjectionConfig().dim == 0 or ProjectionConfig().mode == "sketch"
    assert (manifest["factors_id"] == baseline_factors) == shared
    table = table_of(s3, manifest)
    check_table_schema(table)
    want, _ = reference_table(cfg, inputs["model_dir"], inputs["split"].files, inputs["queries"],
                              reference["factors"] if shared else None)
    print("pipeline vs core (projection.dim=0, dense queries):", assert_same_ranking(table, want, SCORE_RTOL))


def partial_files(s3, root: str, factors_id: str) -> list[str]:
    """The names of a fit's partial-sum units, sorted: ``cov-{unit}`` folders (one file per layer group, each
    checked here) and ``lambda-{unit}`` files (``.safetensors`` dropped; commit markers left out)."""
    folder = f"{root}/factors/{factors_id}/partials"
    names = sorted(p.rsplit("/", 1)[1].removesuffix(".safetensors") for p in s3.ls(folder, refresh=True)
                   if not p.endswith(".json"))
    for name in names:
        if name.startswith("cov-"):
            files = sorted(p.rsplit("/", 1)[1] for p in s3.ls(f"{folder}/{name}", refresh=True))
            count = len(files) - 1
            assert files == sorted([*(f"{i:03d}-of-{count:03d}.safetensors" for i in range(count)),
                                    "_COMMITTED.json"]), files
    return names


def test_fit_units_hold_several_shards_and_fit_what_one_unit_per_shard_fits(baseline, cluster, inputs, s3, reference):
    """``factors.docs_per_unit``: the baseline's fit ran one unit (one partial file per pass) per worker,
    each over several shards; one unit per shard (0), in another storage root, writes a file per shard
    and pass, and fits factors of the same id that rank as the one-process fit does."""
    from pipeline import layout
    from pipeline.commit import read_file_commit
    from pipeline.context import prepare

    bucket, fid = inputs["bucket"], baseline["manifest"]["factors_id"]
    baseline_storage = baseline["cfg"].storage.open()
    cfg = make_cfg(inputs, cluster, "per-shard", dim=0, query_rank=0)
    cfg.storage.root = f"s3://{bucket}/per-shard"
    cfg.factors.docs_per_unit = 0
    shards = prepare(cfg).sample_shards  # the fitting shards: all of them, in listing order (no cap here)
    assert len(shards) == baseline["manifest"]["counts"]["num_shards"] >= 4
    units = fit_units(shards, 2, baseline["cfg"].factors.docs_per_unit)
    assert len(units) == 2 and [s for u in units for s in u] == shards  # one unit per worker, in listing order
    assert partial_files(s3, f"{bucket}/attribution", fid) == sorted(
        f"{kind}-{unit_key(u)}" for u in units for kind in ("cov", "lambda"))
    manifest = run(cfg)
    assert manifest["factors_id"] == fid  # the grouping is not part of the factors' identity
    assert partial_files(s3, f"{bucket}/per-shard", fid) == sorted(
        f"{kind}-{s.shard_id}" for s in shards for kind in ("cov", "lambda"))
    grouped = read_file_commit(baseline_storage, layout.factors_file(baseline_storage.root, fid))
    per_shard = read_file_commit(cfg.storage.open(), layout.factors_file(cfg.storage.root, fid))
    assert (per_shard.num_tokens, per_shard.num_sequences) == (grouped.num_tokens, grouped.num_sequences)
    # Both fits equal the one-process fit through dense queries (test_projection_off_equals_single_process_core
    # checks the grouped one): the low-rank default's range finder would also move with their rounding.
    want, _ = reference_table(cfg, inputs["model_dir"], inputs["split"].files, inputs["queries"], reference["factors"])
    print("one unit per shard vs the core (dense queries):", assert_same_ranking(table_of(s3, manifest), want, SCORE_RTOL))


def test_rerun_skips_every_unit_and_writes_nothing(baseline, cluster, inputs, s3, caplog):
    prefix = f"{inputs['bucket']}/attribution"
    before = objects(s3, prefix)
    results = f"/results/{baseline['manifest']['results']['key']}/"  # shard results are shared by runs (issue 8)
    shard_objects = [k for k in before if results in k]
    assert len(shard_objects) == 2 * baseline["manifest"]["counts"]["num_shards"]  # data + commit marker
    time.sleep(1.1)  # LastModified has one-second resolution
    caplog.set_level(logging.INFO, logger="pipeline")
    manifest = run(make_cfg(inputs, cluster, "baseline"))
    after = objects(s3, prefix)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skip")]
    for shard_id in manifest["shards"]:
        assert any(shard_id in m for m in skipped), f"shard {shard_id} was not skipped"
    assert any(m.endswith("/runs/baseline/attribution") for m in skipped)
    assert any("factors.safetensors" in m for m in skipped) and any("gradients.safetensors" in m for m in skipped)
    assert not any(r.getMessage().startswith("committed ") for r in caplog.records), "a unit was committed again"
    assert_identical_tables(table_of(s3, manifest), baseline["table"])


def test_worker_killed_before_commit_loses_and_duplicates_nothing(baseline, cluster, inputs, s3, env):
    marker = env["marker"]
    os.remove(marker)  # arms the hook: the worker scoring shard KILL_SHARD exits after writing, before committing
    try:
        # run.overwrite: the baseline's shared results would otherwise be reused and nothing scored.
        manifest = run(make_cfg(inputs, cluster, "killed", overwrite=True))
    finally:
        killed = os.path.exists(marker)
        if not killed:
            open(marker, "w").close()  # disarm again
    assert killed, "the kill hook never fired: the test did not kill a worker"
    table = table_of(s3, manifest)
    assert_identical_tables(table, baseline["table"])
    keys = [(r["query_id"], r["polarity"], r["rank"]) for r in sorted_rows(table)]
    assert len(keys) == len(set(keys))
    results = f"{inputs['bucket']}/attribution/results/{manifest['results']['key']}"
    commit = json.loads(s3.cat_file(f"{results}/{manifest['shards'][KILL_SHARD]}.parquet.commit.json"))
    assert commit["info"]["num_docs"] == DOCS_PER_SHARD


def test_overwrite_recomputes_to_the_same_table(baseline, cluster, inputs, s3):
    prefixes = [f"{inputs['bucket']}/attribution/runs/baseline",
                f"{inputs['bucket']}/attribution/results/{baseline['manifest']['results']['key']}"]

    def commits():
        return {
            k: json.loads(s3.cat_file(k))["committed_at"]
            for prefix in prefixes
            for k in s3.find(prefix)
            if k.endswith(".commit.json") or k.endswith("_COMMITTED.json")
        }

    first = commits()
    manifest = run(make_cfg(inputs, cluster, "baseline", overwrite=True))
    second = commits()
    assert set(first) == set(second) and len(first) == manifest["counts"]["num_shards"] + 1
    assert all(second[k] > first[k] for k in first), "overwrite=True left a unit as it was"
    assert_identical_tables(table_of(s3, manifest), baseline["table"])


def test_merge_refuses_while_a_shard_is_uncommitted(baseline, cluster, inputs, s3):
    from pipeline.run import run_stages

    cfg = make_cfg(inputs, cluster, "baseline")
    victim = baseline["manifest"]["shards"][1]
    results = f"{inputs['bucket']}/attribution/results/{baseline['manifest']['results']['key']}"
    marker = f"{results}/{victim}.parquet.commit.json"
    s3.rm_file(marker)
    with pytest.raises(RuntimeError, match="not committed") as e:
        run_stages(cfg, ("merge",))
    assert victim in str(e.value) and "'baseline'" in str(e.value)
    # Scoring again repairs it (only the uncommitted shard is recomputed) and the table is unchanged.
    manifest = run(cfg)
    assert s3.exists(marker)
    assert_identical_tables(table_of(s3, manifest), baseline["table"])


def test_merge_refuses_shards_scored_with_another_top_k(baseline, cluster, inputs):
    from pipeline.run import run_stages

    cfg = make_cfg(inputs, cluster, "baseline")
    asked = cfg.score.top_k + 10  # the shards hold top-k lists of cfg.score.top_k: not enough for a top-(k+10)
    with pytest.raises(MergeRefusedError, match=f"score.top_k={asked}") as e:
        run_stages(replace(cfg, score=replace(cfg.score, top_k=asked)), ("merge",))
    assert f"score.top_k={cfg.score.top_k}" in str(e.value) and "run.overwrite=true" in str(e.value)


def test_planted_documents_are_the_top_proponents(baseline, inputs):
    facts = inputs["facts"]
    num_docs = baseline["manifest"]["counts"]["num_docs"]
    per_fact = demo_recall(baseline["table"], facts, num_docs)
    learned = [f for f in per_fact.values() if f["learned"]]
    print(f"\ndemo: {len(learned)}/{len(facts)} facts learned, {num_docs} documents")
    for fid, f in per_fact.items():
        print(f"  {fid}: learned={f['learned']} copies={f['copies']} top1_gold={f['top1_gold']} "
              f"recall@{f['copies']}={f['recall_at_gold']:.2f} (chance {f['chance']:.3f}) top={f['top_docs']}")
    summary = {}
    for name, group in (("learned", learned), ("all", list(per_fact.values()))):
        if group:
            summary[name] = (
                sum(f["top1_gold"] for f in group) / len(group),
                sum(f["recall_at_gold"] for f in group) / len(group),
                sum(f["chance"] for f in group) / len(group),
            )
            print(f"  {name} facts ({len(group)}): top-1 gold {summary[name][0]:.2f}, "
                  f"mean recall@|gold| {summary[name][1]:.2f}, chance {summary[name][2]:.3f}")
    # Measured on this demo (8 facts, 110 documents): all facts top-1 0.88, recall 0.84, chance 0.034;
    # the one learned fact (8 copies) top-1 1.0, recall 0.75, chance 0.073.
    top1, recall, chance = summary["all"]
    assert recall >= 0.5 and recall >= 10 * chance and top1 >= 0.5, summary
    if learned:
        top1, recall, chance = summary["learned"]
        assert recall >= 0.5 and recall >= 5 * chance and top1 >= 0.5, summary
    else:
        print("  the demo model learned no fact; only the all-facts figures were checked")


def test_lost_query_file_is_joined_again_from_its_committed_parts(baseline, cluster, inputs, s3):
    """Deleting the joined query gradients: the rerun reuses both parts (no query is preconditioned again)."""
    queries = f"{inputs['bucket']}/attribution/queries/{baseline['manifest']['queries_id']}"
    joined = s3.cat_file(f"{queries}/gradients.safetensors")
    parts = objects(s3, f"{queries}/parts")
    assert len(parts) == 4  # two parts, each with its commit marker
    s3.rm([f"{queries}/gradients.safetensors.commit.json", f"{queries}/gradients.safetensors"])
    time.sleep(1.1)  # LastModified has one-second resolution
    manifest = run(make_cfg(inputs, cluster, "baseline"))
    assert objects(s3, f"{queries}/parts") == parts  # neither part was written again
    assert s3.cat_file(f"{queries}/gradients.safetensors") == joined  # the same bytes, joined again
    assert_identical_tables(table_of(s3, manifest), baseline["table"])


def test_lambda_max_documents_fits_lambda_on_the_capped_shards_only(baseline, cluster, inputs, s3):
    """``factors.lambda_max_documents``: every fitting shard's covariances, Lambda only on the capped shards."""
    from pipeline import layout
    from pipeline.commit import read_file_commit
    from pipeline.run import run_stages

    cfg = make_cfg(inputs, cluster, "lambda-cap")
    cfg.factors.lambda_max_documents = DOCS_PER_SHARD + 1  # more than one shard's documents
    cfg.run.stages = ["fit"]
    ctx = run_stages(cfg)
    fitted, capped = ctx.fit_shards, ctx.lambda_shards
    assert 2 <= len(capped) < len(fitted)
    assert sum(s.num_docs for s in capped) > DOCS_PER_SHARD
    assert ctx.factors_id != baseline["manifest"]["factors_id"]  # a subset enters the factors id
    partials = partial_files(s3, f"{inputs['bucket']}/attribution", ctx.factors_id)
    workers, per_unit = cfg.cluster.num_workers, cfg.factors.docs_per_unit
    assert [p for p in partials if p.startswith("lambda-")] == sorted(
        f"lambda-{unit_key(u)}" for u in fit_units(capped, workers, per_unit))
    assert [p for p in partials if p.startswith("cov-")] == sorted(
        f"cov-{unit_key(u)}" for u in fit_units(fitted, workers, per_unit))
    mine = read_file_commit(ctx.storage, ctx.factors_url)
    full = read_file_commit(ctx.storage, layout.factors_file(ctx.storage.root, baseline["manifest"]["factors_id"]))
    assert mine.num_tokens == full.num_tokens  # the covariances saw every fitting window
    assert 0 < mine.num_sequences < full.num_sequences  # Lambda saw the capped shards' windows only


def test_max_documents_fits_both_passes_on_the_capped_sample_only(baseline, cluster, inputs, s3):
    """``factors.max_documents``: covariances and Lambda on the fewest shards in hash order holding the cap."""
    from pipeline.commit import read_file_commit
    from pipeline.pinning import settings_id
    from pipeline.run import run_stages

    cfg = make_cfg(inputs, cluster, "doc-cap")
    cfg.factors.max_documents = DOCS_PER_SHARD + 1  # more than one shard's documents
    cfg.run.stages = ["fit"]
    ctx = run_stages(cfg)
    fitted = ctx.fit_shards
    assert 2 <= len(fitted) < len(ctx.shards) and sum(s.num_docs for s in fitted) > DOCS_PER_SHARD
    assert ctx.lambda_shards == fitted
    assert ctx.factors_id != baseline["manifest"]["factors_id"]
    partials = partial_files(s3, f"{inputs['bucket']}/attribution", ctx.factors_id)
    for kind in ("cov", "lambda"):
        assert [p for p in partials if p.startswith(f"{kind}-")] == sorted(f"{kind}-{s.shard_id}" for s in fitted), kind
    assert 0 < read_file_commit(ctx.storage, ctx.factors_url).num_sequences
    # Its own pinned setting: the uncapped setting's pin is not this one.
    assert ctx.factors_plan.settings_id == settings_id(ctx.fresh_factors_key, 0, 1.0, 0, DOCS_PER_SHARD + 1)
    assert ctx.factors_plan.settings_id != settings_id(ctx.fresh_factors_key, 0, 1.0)
