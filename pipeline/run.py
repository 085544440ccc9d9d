"""The driver: fit -> precondition -> score -> merge, each unit committed and skipped on rerun.

``run_attribution(cfg)`` runs the stages named by ``run.stages`` (all four by
default) and returns the run manifest; ``run_stages(cfg, stages)`` runs the
given ones. Inputs are validated here, on the driver, before any Ray worker is
started (`pipeline.context`: ``prepare`` and ``check_before_workers``).

Storage layout (all under ``storage.root``; every path is built in ``pipeline.layout``):

- ``factors/{factors_id}/``: partial sums per shard, eigenbases, ``factors.safetensors``.
  ``factors_id`` hashes the model fingerprint, tracked modules, Fisher kind,
  fitting space, window, tokenisation (BOS/EOS) and the fitted shards: factors
  are reused by any run that would fit the same ones, and pinned per setting
  (``factor_pins/``, `pipeline.pinning`) so a growing corpus does not refit them.
- ``queries/{queries_id}/gradients.safetensors``: preconditioned query gradients,
  keyed by factors, queries content, damping, projection, query rank, window and tokenisation.
- ``results/{results_key}/{shard_id}.parquet``: each shard's top-k, shared by every
  run with the same scoring (`pipeline.results`): a night scores only new shards;
  ``runs/{run.id}/attribution/``: the ranked table; ``runs/{run.id}/manifest.json``
  (lists the results merged); ``catalog/runs/{run.id}.parquet``: the run's history
  row; ``latest.json``: the newest merged run (`pipeline.catalog`).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import torch

from pipeline import catalog, layout
from pipeline.commit import (
    already_committed,
    commit_dir,
    commit_file,
    read_dir_commit,
    read_file_commit,
)
from pipeline import heap
from pipeline.config import STAGES, AttributeConfig, ConfigError
from pipeline.context import RunContext, check_before_workers, lambda_subset, prepare, worker_spec
from pipeline.core.ekfac import FactorsMeta, layer_groups, write_factors
from pipeline.core.serialization import SafetensorsView
from pipeline.core.tracking import LayerSpec
from pipeline.corpus import corpus_files_json, fit_units, unit_key
from pipeline.errors import CorruptUnitError
from pipeline.identity import digest
from pipeline.merge import merge_run, refuse_unmergeable
from pipeline.pinning import REUSED, FactorsPlan, plan_factors, write_pin
from pipeline.report import write_report

log = logging.getLogger(__name__)


# ---- stages -------------------------------------------------------------------------------


def fit_factors(ctx: RunContext) -> str:
    """The run's factors (`plan_factors` chose them): fitted unless committed, then pinned for their setting."""
    url = _fit(ctx)
    plan = ctx.factors_plan
    if plan is not None and plan.decision != REUSED:
        write_pin(ctx.storage, plan, ctx.counts.get("num_docs", 0), ctx.cfg.run.id)
    return url


def _fit(ctx: RunContext) -> str:
    """Distributed EK-FAC fit: A/S partial sums per shard, eigendecomposition, Lambda partial sums."""
    from pipeline.cluster import run_units

    storage, url, root, fid = ctx.storage, ctx.factors_url, ctx.storage.root, ctx.factors_id
    if already_committed(storage, url):
        return url
    per_unit = ctx.cfg.factors.docs_per_unit
    units = fit_units(ctx.fit_shards, len(ctx.workers), per_unit)
    # The stall bound is per shard of work (a unit of k shards may take k shards' time without finishing).
    stall, widest = ctx.cfg.cluster.stall_timeout_s, max((len(u) for u in units), default=1)
    log.info("fit: %d fitting shards in %d units (factors.docs_per_unit=%d, %d workers); a unit may run %.0f s",
             len(ctx.fit_shards), len(units), per_unit, len(ctx.workers), stall * widest)
    groups = layer_groups({n: (spec["d_out"], spec["d_in"]) for n, spec in ctx.layers.items()})
    cov_urls = [layout.covariance_partial(root, fid, unit_key(u)) for u in units]
    cov_commits = run_units(ctx.workers, [("covariance", (u, url, groups)) for u, url in zip(units, cov_urls)],
                            "fit: covariances", stall_timeout_s=stall, shards_per_unit=widest)
    # Each layer group's sums are added and eigendecomposed on a worker (on its device), not on the driver:
    # the driver never holds the covariances, and the decompositions run side by side across the cluster.
    inf = ctx.cfg.influence()
    count = len(groups)
    names = [layout.group_file(i, count) for i in range(count)]
    checksums = [c.file_checksums() for c in cov_commits]
    if any(c is None or set(names) - set(c) for c in checksums):
        raise CorruptUnitError(f"a covariance unit of factors {fid} lacks its layer groups' files or their "
                               "checksums; delete its folder under partials/ and rerun the fit")
    bases_urls = [layout.eigenbases_group(root, fid, i, count) for i in range(count)]
    calls = [("eigendecompose", ([(layout.url(u, names[i]), c[names[i]]) for u, c in zip(cov_urls, checksums)],
                                 bases_urls[i], inf.fit_eigh_dtype)) for i in range(count)]
    started = time.perf_counter()
    eigh_commits = run_units(ctx.workers, calls, "fit: eigendecompositions", stall_timeout_s=stall)
    log.info("fit: %d eigendecompositions in %s in %d groups on the workers in %.1f s (%.1f s of work)",
             2 * len(ctx.layers), inf.fit_eigh_dtype, count, time.perf_counter() - started,
             sum(c.seconds or 0.0 for c in eigh_commits))
    units = fit_units(ctx.lambda_shards, len(ctx.workers), per_unit)
    widest = max((len(u) for u in units), default=1)
    lam_urls = [layout.lambda_partial(root, fid, unit_key(u)) for u in units]
    lam_commits = run_units(ctx.workers, [("lambdas", (u, bases_urls, url)) for u, url in zip(units, lam_urls)],
                            "fit: eigenvalues", stall_timeout_s=stall, shards_per_unit=widest)
    meta = FactorsMeta(
        model_fingerprint=ctx.model_fp,
        modules_pattern=inf.modules,
        layers={n: LayerSpec(**spec) for n, spec in ctx.layers.items()},
        fisher="empirical" if inf.empirical_fisher else "sampled",
        space=inf.factor_space,
        projection=inf.projection.to_json() if inf.factor_space == "projected" else {},
        extra=ctx.factors_key.metadata(),
    )
    # The factors file is written layer by layer from the groups' bases and the units' Lambda sums, each read
    # where it lies (memory-mapped, or spooled from object storage): the driver never holds the factors whole.
    bases = [SafetensorsView(storage.read_mapped(u, c.checksum)) for u, c in zip(bases_urls, eigh_commits)]
    lams = [SafetensorsView(storage.read_mapped(u, c.checksum)) for u, c in zip(lam_urls, lam_commits)]
    # Lambda stored in the engine's precision (float32 unless float64 references): it divides in that dtype.
    lambda_dtype = torch.float64 if inf.precision == "float64" else torch.float32
    storage.write_stream(url, lambda f: write_factors(f, meta, bases, lams, lambda_dtype))  # sets meta's counts
    num_tokens, num_sequences = meta.num_tokens, meta.num_sequences
    left_out = _fit_left_out(fid, cov_commits, lam_commits)
    commit_file(storage, url, factors_id=fid, num_tokens=num_tokens, num_sequences=num_sequences, **left_out)
    log.info(
        "factors %s fitted on %d tokens in %d fitting shards (%s)",
        fid, num_tokens, len(ctx.fit_shards), layout.factors_dir(root, fid),
    )
    return url


def _fit_left_out(fid: str, cov_commits: list, lam_commits: list) -> dict:
    """The windows the fit's passes left out for non-finite gradients (logged): for the factors' commit, the
    covariance pass's count and a sample of both passes' ``doc_id#window`` (nothing when there are none)."""
    cov = sum(c.num_nonfinite_windows or 0 for c in cov_commits)
    lam = sum(c.num_nonfinite_windows or 0 for c in lam_commits)
    if not cov and not lam:
        return {}
    sample = sorted({w for c in [*cov_commits, *lam_commits] for w in c.nonfinite_windows or []})[:100]
    log.warning("fit: %d windows in the covariance pass and %d in the eigenvalue pass had non-finite gradients "
                "or inputs and were left out of factors %s, e.g. %s", cov, lam, fid, sample[:5])
    return {"num_nonfinite_windows": cov, "nonfinite_windows": sample}


def precondition_queries(ctx: RunContext) -> str:
    """Preconditioned (projected) query gradients, the queries split evenly over the workers.

    Each worker preconditions a contiguous slice and commits it as a part
    (``queries/{id}/parts/``); one worker then joins the parts, in order, into
    the query set's file. A rerun reuses every committed part. With one worker
    (or one query) the worker writes the file directly.
    """
    from pipeline.cluster import run_units

    storage, url, queries = ctx.storage, ctx.queries_url, ctx.queries
    if already_committed(storage, url):
        return url
    stall = ctx.cfg.cluster.stall_timeout_s
    count = min(len(ctx.workers), len(queries))
    if count <= 1:
        run_units(ctx.workers[:1], [("precondition", (queries, ctx.factors_url, url))], "precondition",
                  stall_timeout_s=stall)
        return url
    bounds = [len(queries) * i // count for i in range(count + 1)]
    parts = [layout.query_part(storage.root, ctx.queries_id, i, count) for i in range(count)]
    calls = [("precondition", (queries[lo:hi], ctx.factors_url, part, len(queries)))
             for lo, hi, part in zip(bounds, bounds[1:], parts)]
    # One part per worker at a time: the parts are equal, so they finish together.
    run_units(ctx.workers, calls, "precondition", slots_per_worker=1, stall_timeout_s=stall)
    run_units(ctx.workers[:1], [("join_queries", (parts, url))], "precondition: join", stall_timeout_s=stall)
    return url


def score_corpus(ctx: RunContext) -> list:
    """Every shard scored against every query, unless its result for this scoring is committed (and verified).

    Results are shared by runs (`pipeline.results`): a shard any run scored
    the same way is reused, so a night whose corpus grew scores only the new
    shards (``counts.shards_scored``/``shards_reused``). A run id merged before
    for other queries, factors or ``score.top_k`` is refused (`ConfigError`)
    without ``run.overwrite``; with it, its table is replaced at the merge and
    the results it merged before are left for other runs (and gc). With
    ``run.overwrite`` every shard is rescored, each new result replacing the
    old one when written and its marker last. Returns the commits of the shards scored now.
    """
    from pipeline.cluster import run_units
    from pipeline.store import score_from_store, store_target

    storage, top_k, overwrite = ctx.storage, ctx.cfg.score.top_k, ctx.cfg.run.overwrite
    previous = ctx.previous_manifest()
    if previous is not None and not overwrite:
        before = (previous.get("queries_id"), previous.get("config", {}).get("score", {}).get("top_k"))
        if before != (ctx.queries_id, top_k):
            raise ConfigError(
                f"run.id={ctx.cfg.run.id!r} was merged for other queries, factors or score.top_k (queries "
                f"{before[0]}, score.top_k={before[1]}); give a new run.id, or run.overwrite=true to replace its "
                "table (replaced only when the new one commits)"
            )
    if ctx.cfg.score.source == "store":  # the gradient store, read by Ray tasks without the model
        return score_from_store(ctx)
    store = store_target(ctx)  # the gradient store this pass also writes (store.enabled), else None
    todo, reused = [], 0
    for shard in ctx.shards:
        url = ctx.shard_url(shard)
        done = read_file_commit(storage, url)
        current = done is not None and done.queries_id == ctx.queries_id and done.top_k == top_k
        if current and store is not None and read_file_commit(storage, store.shard_url(ctx.storage.root,
                                                                                     shard.shard_id)) is None:
            current = False  # its store file is missing (or fails verification): rescored to write it
        if current and not overwrite:
            log.info("skip committed %s", url)
            reused += 1
            continue
        todo.append(shard)
    ctx.counts.update(shards_scored=len(todo), shards_reused=reused,
                      shards_scored_per_file=dict(Counter(s.rel_path for s in todo)))
    log.info("score: %d shard(s) to score, %d reused from committed results", len(todo), reused)
    calls = [("score", (s, ctx.queries_url, ctx.shard_url(s), top_k, ctx.queries_id, overwrite, store)) for s in todo]
    return run_units(ctx.workers, calls, "score", stall_timeout_s=ctx.cfg.cluster.stall_timeout_s)


def merge_results(ctx: RunContext) -> str:
    """Merge committed shard results into the ranked table; refuses (`MergeRefusedError`) results it cannot merge."""
    storage, run_id, top_k = ctx.storage, ctx.cfg.run.id, ctx.cfg.score.top_k
    out_dir = layout.attribution_dir(storage.root, run_id)
    commits = {s.shard_id: read_file_commit(storage, ctx.shard_url(s)) for s in ctx.shards}
    _explain_missing(ctx, commits)
    refuse_unmergeable(run_id, commits, ctx.queries_id, top_k)
    # The shards' checksums, not only their ids: a shard rescored to other bytes makes the table stale.
    shards = {sid: c.sha256 for sid, c in sorted(commits.items())}
    merged_from = digest({"shards": shards, "queries_id": ctx.queries_id, "top_k": top_k})
    done = read_dir_commit(storage, out_dir)
    if done is not None and done.merged_from == merged_from and not ctx.cfg.run.overwrite:
        log.info("skip committed %s", out_dir)
        entry = catalog.read_entry(storage, run_id)
        if entry is None or entry["status"] != catalog.MERGED:  # merged, but the run stopped before its catalog row
            _catalog_merged(ctx, out_dir, done.num_rows or 0)
        return out_dir
    # The new tables replace the old ones file by file (each write is atomic) and the new marker comes last:
    # the old table is never deleted first, and the manifest and latest.json always point at a whole table.
    table = merge_run(ctx)  # every table of the run (pipeline.tables); the ranked one last
    commit_dir(storage, out_dir, merged_from=merged_from, num_rows=table.num_rows)
    ctx.counts.update(_shard_counts(list(commits.values())))
    if len(ctx.counts["scoring_products"]) > 1:
        log.warning("the shards were scored with different products (%s; score.product_dtype=%s resolves per "
                    "worker): their scores differ by the products' rounding", ", ".join(ctx.counts["scoring_products"]),
                    ctx.cfg.score.product_dtype)
    ctx.counts.setdefault("shards_scored", 0)
    ctx.counts.setdefault("shards_reused", len(ctx.shards) - ctx.counts["shards_scored"])
    write_manifest(ctx, out_dir)
    write_report(storage, run_id)  # runs/{run.id}/report.html, from the tables and manifest just written
    _catalog_merged(ctx, out_dir, table.num_rows)
    return out_dir


def _explain_missing(ctx: RunContext, commits: dict) -> None:
    """For shards with no result under this scoring, the results this run id merged before (if other).

    So the merge's refusal names what they were scored with (another ``score.top_k``, other queries)
    rather than only that they are missing.
    """
    previous = ctx.previous_manifest()
    key = (previous or {}).get("results", {}).get("key")
    if key is None or key == ctx.results_key.id or all(c is not None for c in commits.values()):
        return
    for sid, c in commits.items():
        if c is None:
            commits[sid] = read_file_commit(ctx.storage, layout.shared_shard_result(ctx.storage.root, key, sid),
                                            verify=False)


def _catalog_merged(ctx: RunContext, table_url: str, num_rows: int) -> None:
    """The run's catalog row, now merged; then latest.json moves to it if it started later (`catalog`)."""
    plan = ctx.factors_plan
    catalog.write_entry(ctx.storage, {
        **_catalog_row(ctx, catalog.MERGED),
        "factors_decision": plan.decision if plan else None,
        "queries_id": ctx.queries_id,
        "results_key": ctx.results_key.id,
        "shards_scored": ctx.counts.get("shards_scored"),
        "shards_reused": ctx.counts.get("shards_reused"),
        "num_rows": num_rows,
        "attribution": table_url,
    })
    catalog.advance_latest(ctx.storage)


def _catalog_row(ctx: RunContext, status: str) -> dict:
    return {
        "run_id": ctx.cfg.run.id,
        "status": status,
        "started_at": ctx.started_at,
        "ended_at": catalog.now_utc() if status != catalog.RUNNING else None,
        "model_fingerprint": ctx.model_fp or None,
        "factors_id": ctx.factors_plan.key.id if ctx.factors_plan else None,
        "queries_fingerprint": ctx.queries_fp,
        "corpus_fingerprint": ctx.corpus_fp,
        "top_k": ctx.cfg.score.top_k,
        "num_docs": ctx.counts.get("num_docs"),
        "num_shards": len(ctx.shards),
    }


def _shard_counts(commits: list) -> dict:
    """The run's counts summed over its shards' commits, with a sample of skipped and non-finite items."""
    return {
        "num_windows": sum(c.num_windows or 0 for c in commits),
        "num_tokens": sum(c.num_tokens or 0 for c in commits),
        "num_skipped_docs": sum(c.num_skipped_docs or 0 for c in commits),
        "num_nonfinite_windows": sum(c.num_nonfinite_windows or 0 for c in commits),
        "skipped_docs_sample": [d for c in commits for d in c.skipped_docs or []][:20],
        "nonfinite_windows_sample": [d for c in commits for d in c.nonfinite_windows or []][:20],
        # What score.product_dtype resolved to on the workers (several on a mixed cluster: auto picks per worker).
        "scoring_products": sorted({c.scoring_products for c in commits if c.scoring_products}),
    }


def write_manifest(ctx: RunContext, table_url: str) -> dict:
    manifest = {
        "run_id": ctx.cfg.run.id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "attribution": table_url,
        "model": {"path": ctx.cfg.model.path, "fingerprint": ctx.model_fp},
        "factors_id": ctx.factors_id,
        "queries_id": ctx.queries_id,
        "corpus": {
            "path": ctx.cfg.corpus.path,
            "fingerprint": ctx.corpus_fp,
            "window": ctx.cfg.corpus.window,
            "tokenisation": ctx.tokenisation.to_json(),
        },
        "queries": {"path": ctx.cfg.queries.path, "fingerprint": ctx.queries_fp},
        "config": ctx.cfg.to_json(),
        "counts": {k: v for k, v in {**ctx.counts, **ctx.bad_texts}.items() if k != "shards_scored_per_file"},
        "timings": ctx.timings,
        "shards": [s.shard_id for s in ctx.shards],
        "started_at": ctx.started_at,
        # Which factors and why (pipeline.pinning); the shared results merged (pipeline.results).
        "factors": ctx.factors_plan.to_json(ctx.counts.get("num_docs", 0)) if ctx.factors_plan else None,
        "results": {"key": ctx.results_key.id, "setting": ctx.results_key.to_json(),
                    "url": layout.results_dir(ctx.storage.root, ctx.results_key.id)},
    }
    if ctx.results_key.rescore:  # two-stage: the store's shortlists too (kept by gc with the run)
        from pipeline.store import shortlist_key

        manifest["results"]["shortlist_key"] = shortlist_key(ctx).id
    # Per file: its shards, and how many were scored by this run (the others reused committed results).
    manifest["corpus"]["files"] = corpus_files_json(ctx.files, ctx.shards, ctx.counts.get("shards_scored_per_file", {}))
    root = ctx.storage.root
    ctx.storage.write_json(layout.run_manifest(root, ctx.cfg.run.id), manifest)
    return manifest


# ---- entry points -------------------------------------------------------------------------


def _timed(ctx: RunContext, name: str, fn):
    started = time.perf_counter()
    result = fn(ctx)
    heap.release()  # the stage's temporaries go back to the OS before the workers' next stage
    ctx.timings[f"{name}_s"] = round(time.perf_counter() - started, 3)
    log.info("stage %s: %.2fs", name, ctx.timings[f"{name}_s"])
    return result


STAGE_FUNCTIONS = {"fit": fit_factors, "precondition": precondition_queries, "score": score_corpus,
                   "merge": merge_results}


def run_stages(cfg: AttributeConfig, stages: Sequence[str] | None = None) -> RunContext:
    """Validate, start or join Ray, start the workers, run ``stages`` (default: ``run.stages``) in ``STAGES`` order."""
    from pipeline.cluster import call_within, keep_workers, ray_session, start_workers

    if stages is not None:
        cfg = replace(cfg, run=replace(cfg.run, stages=list(stages)))
    ctx = check_before_workers(prepare(cfg))
    entry = catalog.read_entry(ctx.storage, ctx.cfg.run.id)
    # A rerun keeps the run's first start (and writes nothing here); a new run enters the catalog as running.
    ctx.started_at = entry["started_at"] if entry and entry.get("started_at") else catalog.now_utc()
    if entry is None:
        catalog.write_entry(ctx.storage, _catalog_row(ctx, catalog.RUNNING))
    try:
        with ray_session(ctx.cfg.cluster):
            started = time.perf_counter()
            spec = worker_spec(ctx.cfg, ctx.tokenisation)
            ctx.workers = start_workers(spec, ctx.cfg.cluster)
            stall = ctx.cfg.cluster.stall_timeout_s
            ctx.model_fp = call_within(ctx.workers[0], "fingerprint", stall_timeout_s=stall)
            ctx.layers = call_within(ctx.workers[0], "layer_specs", stall_timeout_s=stall)
            ctx.timings["workers_s"] = round(time.perf_counter() - started, 3)
            ctx.factors_plan = _plan_factors(ctx)
            for stage in STAGES:
                if stage in ctx.cfg.run.stages:
                    _timed(ctx, stage, STAGE_FUNCTIONS[stage])
            keep_workers(ctx.workers, spec, ctx.cfg.cluster)
    except BaseException:
        _catalog_failed(ctx)
        raise
    return ctx


def _plan_factors(ctx: RunContext) -> FactorsPlan:
    f = ctx.cfg.factors
    sample = ctx.sample_shards
    plan = plan_factors(ctx.storage, ctx.fresh_factors_key, sample,
                        lambda_subset(sample, f.lambda_sample, f.lambda_max_documents), ctx.shards,
                        f.sample_shards, f.lambda_sample, f.refit, f.refit_below_share, f.lambda_max_documents,
                        ctx.binding_max_documents)
    log.info("factors %s: %s (%s)", plan.key.id, plan.decision, plan.reason)
    return plan


def _catalog_failed(ctx: RunContext) -> None:
    """Mark the run failed in the catalog unless it has a merged table already (best effort: never masks the error)."""
    try:
        entry = catalog.read_entry(ctx.storage, ctx.cfg.run.id)
        if entry is None or entry["status"] != catalog.MERGED:
            catalog.write_entry(ctx.storage, _catalog_row(ctx, catalog.FAILED))
    except Exception as exc:  # the run's own failure matters more
        log.warning("could not mark run %s failed in the catalog: %s", ctx.cfg.run.id, exc)


def run_attribution(cfg: AttributeConfig) -> dict | None:
    """The stages of ``run.stages`` (default: all); the run manifest (``runs/{run.id}/manifest.json``) if merged."""
    ctx = run_stages(cfg)
    if "merge" not in ctx.cfg.run.stages:
        return None
    return ctx.storage.read_json(layout.run_manifest(ctx.storage.root, ctx.cfg.run.id))
