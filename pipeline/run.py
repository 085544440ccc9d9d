"""The driver: fit -> precondition -> score -> merge, each unit committed and skipped on rerun.

``run_attribution(cfg)`` runs the stages named by ``run.stages`` (all four by
default) and returns the run manifest; ``run_stages(cfg, stages)`` runs the
given ones. Inputs are validated here, on the driver, before any Ray worker is
started: config, storage, model folder, corpus and queries (``prepare``), then
the model's modules, window, memory, tokenisation, query lengths and weights
(``pipeline.preflight``), which also resolve ``corpus.window`` and
``corpus.add_bos``/``add_eos`` when unset.

Storage layout (all under ``storage.root``; every path is built in ``pipeline.layout``):

- ``factors/{factors_id}/``: partial sums per shard, eigenbases, ``factors.safetensors``.
  ``factors_id`` hashes the model fingerprint, tracked modules, Fisher kind,
  fitting space, window, tokenisation (BOS/EOS) and the fitted shards: factors
  are reused by any run that would fit the same ones.
- ``queries/{queries_id}/gradients.safetensors``: preconditioned query gradients,
  keyed by factors, queries content, damping, projection, query rank, window and tokenisation.
- ``runs/{run.id}/shards/{shard_id}.parquet``: each shard's top-k;
  ``runs/{run.id}/attribution/``: the ranked table; ``runs/{run.id}/manifest.json``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from pipeline import layout
from pipeline.commit import (
    already_committed,
    commit_dir,
    commit_file,
    read_dir_commit,
    read_file_commit,
)
from pipeline.config import STAGES, AttributeConfig, ConfigError
from pipeline.core.ekfac import CovarianceSums, EKFACFactors, FactorsMeta, LambdaSums, eigendecompose
from pipeline.core.text import Tokenisation
from pipeline.core.tracking import LayerSpec
from pipeline.corpus import (
    Query,
    Shard,
    bad_text_counts,
    corpus_fingerprint,
    list_corpus,
    make_shards,
    read_queries,
    spread,
)
from pipeline.identity import FactorsKey, QueriesKey, digest
from pipeline.merge import merge_run, refuse_unmergeable
from pipeline.model_io import check_model_dir
from pipeline.report import write_report
from pipeline.storage import Storage, bounded_options
from pipeline.worker import WorkerSpec

log = logging.getLogger(__name__)

@dataclass
class RunContext:
    """What every stage needs, established once on the driver."""

    cfg: AttributeConfig
    storage: Storage
    shards: list[Shard]
    corpus_fp: str
    queries: list[Query]
    queries_fp: str
    workers: list = field(default_factory=list)
    # BOS/EOS around documents and queries, resolved against the tokenizer by the preflight.
    tokenisation: Tokenisation = field(default_factory=Tokenisation)
    # Null and non-string texts of the corpus (``corpus.bad_text_counts``), for the manifest's counts.
    bad_texts: dict = field(default_factory=dict)
    model_fp: str = ""
    layers: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    # ---- content-addressed ids ------------------------------------------------------------

    @property
    def fit_shards(self) -> list[Shard]:
        return spread(self.shards, self.cfg.factors.sample_shards)

    @property
    def lambda_shards(self) -> list[Shard]:
        """The fitting shards of the eigenvalue-correction pass: ``factors.lambda_sample`` of them, evenly spread."""
        fraction, shards = self.cfg.factors.lambda_sample, self.fit_shards
        if not 0 < fraction <= 1:
            raise ConfigError(f"factors.lambda_sample must be in (0, 1] (1 = all fitting shards), got {fraction}")
        return spread(shards, math.ceil(fraction * len(shards)))

    @cached_property
    def factors_key(self) -> FactorsKey:
        """What determines the factors; computed once (it lists every fitting shard)."""
        if not self.model_fp:
            raise RuntimeError("factors_key needs the model fingerprint; start the workers first")
        shard_ids = [s.shard_id for s in self.fit_shards]
        lambda_ids = [s.shard_id for s in self.lambda_shards]
        return FactorsKey.of(
            self.cfg.influence(), self.model_fp, self.cfg.corpus.window, shard_ids, lambda_ids, self.tokenisation
        )

    @property
    def factors_id(self) -> str:
        return self.factors_key.id

    @property
    def factors_url(self) -> str:
        return layout.factors_file(self.storage.root, self.factors_id)

    @cached_property
    def queries_key(self) -> QueriesKey:
        return QueriesKey.of(
            self.cfg.influence(), self.factors_id, self.queries_fp, self.cfg.corpus.window, self.tokenisation
        )

    @property
    def queries_id(self) -> str:
        return self.queries_key.id

    @property
    def queries_url(self) -> str:
        return layout.query_gradients(self.storage.root, self.queries_id)

    def shard_url(self, shard: Shard) -> str:
        return layout.shard_result(self.storage.root, self.cfg.run.id, shard.shard_id)


def resolve_demo(cfg: AttributeConfig) -> AttributeConfig:
    """With no model/corpus/queries given, build (once, cached) the demo and point the config at it.

    The demo's window, when ``corpus.window`` is unset, is the one its model was trained on (64 tokens).
    """
    if not cfg.uses_demo:
        return cfg
    from pipeline.demo import DemoSpec, build_demo

    spec = DemoSpec()
    demo = build_demo(cfg.demo.cache_dir, spec)
    window = spec.window if cfg.corpus.window is None else cfg.corpus.window
    return replace(
        cfg,
        model=replace(cfg.model, path=demo.model_dir),
        corpus=replace(cfg.corpus, path=demo.corpus_path, window=window),
        queries=replace(cfg.queries, path=demo.queries_path),
    )


def prepare(cfg: AttributeConfig) -> RunContext:
    """Validate config and inputs on the driver (no Ray yet): storage, model folder, corpus, queries."""
    cfg.validate()
    cfg = resolve_demo(cfg)
    started = time.perf_counter()
    # Every filesystem built from the options (storage, corpus, model, workers) gets the bounded timeouts.
    bounded = bounded_options(cfg.storage.options, cfg.storage.timeout_s, cfg.storage.retries)
    cfg = replace(cfg, storage=replace(cfg.storage, options=bounded))
    storage = Storage(cfg.storage.root, cfg.storage.options, timeout_s=cfg.storage.timeout_s,
                      retries=cfg.storage.retries)
    storage.check_writable()
    check_model_dir(cfg.model.path, cfg.storage.options)
    files = list_corpus(
        cfg.corpus.path, cfg.corpus.id_column, cfg.corpus.text_column, cfg.storage.options,
        cfg.corpus.check_unique_ids, cfg.corpus.on_bad_text,
    )
    shards = make_shards(files, cfg.corpus.docs_per_shard)
    queries, queries_fp = read_queries(cfg.queries.path, cfg.storage.options)
    ctx = RunContext(cfg, storage, shards, corpus_fingerprint(files), queries, queries_fp)
    ctx.bad_texts = bad_text_counts(files)
    ctx.counts.update(
        num_files=len(files), num_docs=sum(f.num_rows for f in files), num_shards=len(shards), num_queries=len(queries)
    )
    ctx.timings["validate_s"] = round(time.perf_counter() - started, 3)
    log.info(
        "corpus: %d documents in %d files, %d shards; %d queries",
        ctx.counts["num_docs"], len(files), len(shards), len(queries),
    )
    return ctx


def check_before_workers(ctx: RunContext) -> RunContext:
    """The driver preflight (``pipeline.preflight``); resolves ``corpus.window``/``add_bos``/``add_eos`` in ``ctx``."""
    from pipeline.preflight import preflight

    started = time.perf_counter()
    checked = preflight(ctx.cfg, ctx.queries)
    tok = checked.tokenisation
    ctx.cfg = replace(
        ctx.cfg, corpus=replace(ctx.cfg.corpus, window=checked.window, add_bos=tok.add_bos, add_eos=tok.add_eos)
    )
    ctx.tokenisation = tok
    ctx.timings["preflight_s"] = round(time.perf_counter() - started, 3)
    return ctx


def worker_spec(cfg: AttributeConfig, tokenisation: Tokenisation = Tokenisation()) -> WorkerSpec:
    """What a worker needs, from a config whose window the preflight resolved."""
    return WorkerSpec(
        model_path=cfg.model.path,
        model_cache_dir=cfg.model.cache_dir,
        trust_remote_code=cfg.model.trust_remote_code,
        influence=cfg.influence(),
        id_column=cfg.corpus.id_column,
        text_column=cfg.corpus.text_column,
        window_len=cfg.corpus.window,
        tokenisation=tokenisation,
        fit_batch_size=cfg.factors.batch_size,
        score_batch_size=cfg.score.batch_size,
        storage_root=cfg.storage.root,
        storage_options=dict(cfg.storage.options),
        device="auto" if cfg.cluster.gpus_per_worker > 0 else "cpu",
    )


# ---- stages -------------------------------------------------------------------------------


def fit_factors(ctx: RunContext) -> str:
    """Distributed EK-FAC fit: A/S partial sums per shard, eigendecomposition, Lambda partial sums."""
    from pipeline.cluster import run_units

    storage, url, root, fid = ctx.storage, ctx.factors_url, ctx.storage.root, ctx.factors_id
    if already_committed(storage, url):
        return url
    shards = ctx.fit_shards
    cov_urls = [layout.covariance_partial(root, fid, s.shard_id) for s in shards]
    stall = ctx.cfg.cluster.stall_timeout_s
    cov_commits = run_units(ctx.workers, [("covariance", (s, u)) for s, u in zip(shards, cov_urls)],
                            "fit: covariances", stall_timeout_s=stall)
    cov = None
    for u, c in zip(cov_urls, cov_commits):
        part = CovarianceSums.from_tensors(storage.read_safetensors(u, c.checksum)[0])
        cov = part if cov is None else cov + part
    bases = eigendecompose(cov)
    bases_url = layout.eigenbases(root, fid)
    if not already_committed(storage, bases_url):
        tensors = {f"{n}::Q_A": bases.q_a[n] for n in bases.q_a}
        tensors.update({f"{n}::Q_S": bases.q_s[n] for n in bases.q_s})
        storage.write_safetensors(bases_url, tensors)
        commit_file(storage, bases_url, num_tokens=bases.num_tokens)
    lam_shards = ctx.lambda_shards
    lam_urls = [layout.lambda_partial(root, fid, s.shard_id) for s in lam_shards]
    lam_commits = run_units(ctx.workers, [("lambdas", (s, bases_url, u)) for s, u in zip(lam_shards, lam_urls)],
                            "fit: eigenvalues", stall_timeout_s=stall)
    lam = None
    for u, c in zip(lam_urls, lam_commits):
        part = LambdaSums.from_tensors(storage.read_safetensors(u, c.checksum)[0])
        lam = part if lam is None else lam + part
    inf = ctx.cfg.influence()
    meta = FactorsMeta(
        model_fingerprint=ctx.model_fp,
        modules_pattern=inf.modules,
        layers={n: LayerSpec(**spec) for n, spec in ctx.layers.items()},
        fisher="empirical" if inf.empirical_fisher else "sampled",
        space=inf.factor_space,
        projection=inf.projection.to_json() if inf.factor_space == "projected" else {},
        extra=ctx.factors_key.metadata(),
    )
    factors = EKFACFactors.from_parts(meta, bases, lam)
    storage.write_bytes(url, factors.to_bytes())
    commit_file(storage, url, factors_id=fid, num_tokens=bases.num_tokens, num_sequences=lam.num_sequences)
    log.info(
        "factors %s fitted on %d tokens in %d fitting shards (%s)",
        fid, bases.num_tokens, len(shards), layout.factors_dir(root, fid),
    )
    return url


def precondition_queries(ctx: RunContext) -> str:
    """Preconditioned (projected) query gradients, computed once by one worker."""
    from pipeline.cluster import run_units

    url = ctx.queries_url
    if not already_committed(ctx.storage, url):
        run_units(ctx.workers[:1], [("precondition", (ctx.queries, ctx.factors_url, url))], "precondition",
                  stall_timeout_s=ctx.cfg.cluster.stall_timeout_s)
    return url


def score_corpus(ctx: RunContext) -> list:
    """Every shard scored against every query; shards already committed (and verified) for these queries are skipped.

    A shard committed for other queries or another ``score.top_k`` is stale:
    without ``run.overwrite`` the run refuses (`ConfigError`) rather than
    replace it; with it, the new result replaces the old one when written and
    its marker last, so nothing is deleted before its replacement exists.
    Returns the commits of the shards scored now.
    """
    from pipeline.cluster import run_units

    storage, top_k, overwrite = ctx.storage, ctx.cfg.score.top_k, ctx.cfg.run.overwrite
    todo, stale = [], []
    for shard in ctx.shards:
        url = ctx.shard_url(shard)
        done = read_file_commit(storage, url)
        current = done is not None and done.queries_id == ctx.queries_id and done.top_k == top_k
        if current and not overwrite:
            log.info("skip committed %s", url)
            continue
        if done is not None and not current:
            stale.append(shard.shard_id)
        todo.append(shard)
    if stale and not overwrite:
        raise ConfigError(
            f"run.id={ctx.cfg.run.id!r} has {len(stale)} shard result(s) committed for other queries, factors or "
            f"score.top_k (e.g. {stale[:3]}); give a new run.id, or run.overwrite=true to replace them (each is "
            "replaced only when its new result commits)"
        )
    if stale:
        log.warning("replacing %d stale shard result(s) of run %s (run.overwrite=true), e.g. %s",
                    len(stale), ctx.cfg.run.id, stale[:3])
    calls = [("score", (s, ctx.queries_url, ctx.shard_url(s), top_k, ctx.queries_id, overwrite)) for s in todo]
    return run_units(ctx.workers, calls, "score", stall_timeout_s=ctx.cfg.cluster.stall_timeout_s)


def merge_results(ctx: RunContext) -> str:
    """Merge committed shard results into the ranked table; refuses (`MergeRefusedError`) results it cannot merge."""
    storage, run_id, top_k = ctx.storage, ctx.cfg.run.id, ctx.cfg.score.top_k
    out_dir = layout.attribution_dir(storage.root, run_id)
    commits = {s.shard_id: read_file_commit(storage, ctx.shard_url(s)) for s in ctx.shards}
    refuse_unmergeable(run_id, commits, ctx.queries_id, top_k)
    # The shards' checksums, not only their ids: a shard rescored to other bytes makes the table stale.
    shards = {sid: c.sha256 for sid, c in sorted(commits.items())}
    merged_from = digest({"shards": shards, "queries_id": ctx.queries_id, "top_k": top_k})
    done = read_dir_commit(storage, out_dir)
    if done is not None and done.merged_from == merged_from and not ctx.cfg.run.overwrite:
        log.info("skip committed %s", out_dir)
        return out_dir
    # The new tables replace the old ones file by file (each write is atomic) and the new marker comes last:
    # the old table is never deleted first, and the manifest and latest.json always point at a whole table.
    table = merge_run(ctx)  # every table of the run (pipeline.tables); the ranked one last
    commit_dir(storage, out_dir, merged_from=merged_from, num_rows=table.num_rows)
    ctx.counts.update(_shard_counts(list(commits.values())))
    write_manifest(ctx, out_dir)
    write_report(storage, run_id)  # runs/{run.id}/report.html, from the tables and manifest just written
    return out_dir


def _shard_counts(commits: list) -> dict:
    """The run's counts summed over its shards' commits, with a sample of skipped and non-finite items."""
    return {
        "num_windows": sum(c.num_windows or 0 for c in commits),
        "num_tokens": sum(c.num_tokens or 0 for c in commits),
        "num_skipped_docs": sum(c.num_skipped_docs or 0 for c in commits),
        "num_nonfinite_windows": sum(c.num_nonfinite_windows or 0 for c in commits),
        "skipped_docs_sample": [d for c in commits for d in c.skipped_docs or []][:20],
        "nonfinite_windows_sample": [d for c in commits for d in c.nonfinite_windows or []][:20],
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
        "counts": {**ctx.counts, **ctx.bad_texts},
        "timings": ctx.timings,
        "shards": [s.shard_id for s in ctx.shards],
    }
    root = ctx.storage.root
    ctx.storage.write_json(layout.run_manifest(root, ctx.cfg.run.id), manifest)
    ctx.storage.write_json(layout.latest_pointer(root), {"run_id": ctx.cfg.run.id, "attribution": table_url})
    return manifest


# ---- entry points -------------------------------------------------------------------------


def _timed(ctx: RunContext, name: str, fn):
    started = time.perf_counter()
    result = fn(ctx)
    ctx.timings[f"{name}_s"] = round(time.perf_counter() - started, 3)
    log.info("stage %s: %.2fs", name, ctx.timings[f"{name}_s"])
    return result


STAGE_FUNCTIONS = {"fit": fit_factors, "precondition": precondition_queries, "score": score_corpus,
                   "merge": merge_results}


def run_stages(cfg: AttributeConfig, stages: Sequence[str] | None = None) -> RunContext:
    """Validate, start or join Ray, start the workers, run ``stages`` (default: ``run.stages``) in ``STAGES`` order."""
    import ray

    from pipeline.cluster import ray_session, start_workers

    if stages is not None:
        cfg = replace(cfg, run=replace(cfg.run, stages=list(stages)))
    ctx = check_before_workers(prepare(cfg))
    with ray_session(ctx.cfg.cluster):
        started = time.perf_counter()
        ctx.workers = start_workers(worker_spec(ctx.cfg, ctx.tokenisation), ctx.cfg.cluster)
        ctx.model_fp = ray.get(ctx.workers[0].fingerprint.remote())
        ctx.layers = ray.get(ctx.workers[0].layer_specs.remote())
        ctx.timings["workers_s"] = round(time.perf_counter() - started, 3)
        for stage in STAGES:
            if stage in ctx.cfg.run.stages:
                _timed(ctx, stage, STAGE_FUNCTIONS[stage])
    return ctx


def run_attribution(cfg: AttributeConfig) -> dict | None:
    """The stages of ``run.stages`` (default: all); the run manifest (``runs/{run.id}/manifest.json``) if merged."""
    ctx = run_stages(cfg)
    if "merge" not in ctx.cfg.run.stages:
        return None
    return ctx.storage.read_json(layout.run_manifest(ctx.storage.root, ctx.cfg.run.id))
