"""What every stage needs, established once on the driver before any Ray worker starts.

``prepare(cfg)`` validates the config and the inputs (storage, model folder,
corpus listing, queries) and returns a `RunContext`; ``check_before_workers``
runs the driver preflight (`pipeline.preflight`: modules, window, memory,
tokenisation, query lengths, weights), which also resolves ``corpus.window``
and ``corpus.add_bos``/``add_eos`` when unset. The context derives the run's
content-addressed ids (factors, queries, shard results) and their URLs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property

from pipeline import catalog, layout
from pipeline.config import AttributeConfig, ConfigError
from pipeline.core.text import Tokenisation
from pipeline.corpus import (
    CorpusFile,
    Query,
    Shard,
    bad_text_counts,
    corpus_files_json,
    corpus_fingerprint,
    hash_sample,
    list_corpus,
    make_shards,
    read_queries,
    spread,
)
from pipeline.fingerprints import FingerprintCache
from pipeline.identity import FactorsKey, QueriesKey
from pipeline.model_io import check_model_dir
from pipeline.pinning import FactorsPlan
from pipeline.results import ResultsKey
from pipeline.shard_result import TOKEN_ROWS
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
    # The corpus listing (for the manifest's file list); the factors the run uses and why (`plan_factors`).
    files: list[CorpusFile] = field(default_factory=list)
    factors_plan: FactorsPlan | None = None
    # The run id's first start (its catalog row's, kept by reruns): orders runs for latest.json.
    started_at: str = ""

    # ---- content-addressed ids ------------------------------------------------------------

    @property
    def sample_shards(self) -> list[Shard]:
        """The current fitting sample: ``factors.sample_shards`` shards chosen by hash of id (all when 0),
        no more than hold ``factors.max_documents`` documents (no cap when 0)."""
        return hash_sample(self.shards, self.cfg.factors.sample_shards, self.cfg.factors.max_documents)

    @property
    def binding_max_documents(self) -> int:
        """``factors.max_documents`` when it drops shards from the fitting sample, else 0.

        What the pin's setting records (`pipeline.pinning.settings_id`): a cap the corpus is under changes
        no fit, so pins made before the cap (or its default) existed keep their ids until the corpus grows
        past it.
        """
        f = self.cfg.factors
        binds = len(self.sample_shards) < len(hash_sample(self.shards, f.sample_shards))
        return f.max_documents if binds else 0

    @property
    def fit_shards(self) -> list[Shard]:
        """The shards the run's factors are (to be) fitted on: the plan's, else the current sample."""
        return self.factors_plan.fit_shards if self.factors_plan is not None else self.sample_shards

    @property
    def lambda_shards(self) -> list[Shard]:
        """The fitting shards of the eigenvalue-correction pass (`lambda_subset` of them)."""
        if self.factors_plan is not None and self.factors_plan.lambda_shards:
            return self.factors_plan.lambda_shards
        f = self.cfg.factors
        return lambda_subset(self.fit_shards, f.lambda_sample, f.lambda_max_documents)

    @cached_property
    def fresh_factors_key(self) -> FactorsKey:
        """The key of factors fitted on the current sample; computed once (it lists every fitting shard)."""
        if not self.model_fp:
            raise RuntimeError("factors_key needs the model fingerprint; start the workers first")
        shards = self.sample_shards
        f = self.cfg.factors
        lambda_ids = [s.shard_id for s in lambda_subset(shards, f.lambda_sample, f.lambda_max_documents)]
        return FactorsKey.of(
            self.cfg.influence(), self.model_fp, self.cfg.corpus.window, [s.shard_id for s in shards], lambda_ids,
            self.tokenisation,
        )

    @property
    def factors_key(self) -> FactorsKey:
        """What determines the run's factors: the plan's (pinned or fitted now), else the current sample's."""
        return self.factors_plan.key if self.factors_plan is not None else self.fresh_factors_key

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

    @property
    def results_key(self) -> ResultsKey:
        c = self.cfg
        from pipeline.store import store_id_for_results

        store = store_id_for_results(c, self.factors_id)
        return ResultsKey(self.queries_id, c.score.top_k, c.score.batch_size, c.model.precision, TOKEN_ROWS,
                          store=store, rescore=c.store.rescore if store else 0,
                          product_dtype=c.score.product_dtype if c.model.precision != "float64" else "float32")

    def shard_url(self, shard: Shard) -> str:
        """Where the shard's result for this run's scoring lives (shared by runs, `pipeline.results`)."""
        return layout.shared_shard_result(self.storage.root, self.results_key.id, shard.shard_id)

    def previous_manifest(self) -> dict | None:
        """This run id's manifest from an earlier merge, or None."""
        try:
            return self.storage.read_json(layout.run_manifest(self.storage.root, self.cfg.run.id))
        except FileNotFoundError:
            return None


def lambda_subset(shards: list[Shard], fraction: float, max_documents: int = 0) -> list[Shard]:
    """The fitting shards of the Lambda pass, evenly spread: ``factors.lambda_sample`` of them, and with
    ``factors.lambda_max_documents`` > 0 no more than the fewest that hold that many documents.

    The cap counts whole shards: the subset is the smallest evenly spread one holding at least
    ``max_documents`` documents (all shards when they hold fewer).
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"factors.lambda_sample must be in (0, 1] (1 = all fitting shards), got {fraction}")
    if max_documents < 0:
        raise ConfigError(f"factors.lambda_max_documents must be >= 0 (0 = no cap), got {max_documents}")
    count = math.ceil(fraction * len(shards))
    if max_documents:
        total = sum(s.num_docs for s in shards)
        if total > max_documents:
            capped = max(1, math.ceil(max_documents * len(shards) / total))  # the count if shards were equal
            while capped < len(shards) and sum(s.num_docs for s in spread(shards, capped)) < max_documents:
                capped += 1
            count = min(count, capped)
    return spread(shards, count)


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
    storage = cfg.storage.open()
    storage.check_writable()
    check_model_dir(cfg.model.path, cfg.storage.options)
    files = list_corpus(
        cfg.corpus.path, cfg.corpus.id_column, cfg.corpus.text_column, cfg.storage.options,
        cfg.corpus.check_unique_ids, cfg.corpus.on_bad_text, cache=FingerprintCache(storage, cfg.corpus.path),
    )
    shards = make_shards(files, cfg.corpus.docs_per_shard)
    queries, queries_fp = read_queries(cfg.queries.path, cfg.storage.options)
    ctx = RunContext(cfg, storage, shards, corpus_fingerprint(files), queries, queries_fp, files=files)
    ctx.bad_texts = bad_text_counts(files)
    ctx.counts.update(_vanished_files(storage, files, cfg.corpus.path))
    ctx.counts.update(
        num_files=len(files), num_docs=sum(f.num_rows for f in files), num_shards=len(shards), num_queries=len(queries)
    )
    ctx.timings["validate_s"] = round(time.perf_counter() - started, 3)
    log.info(
        "corpus: %d documents in %d files, %d shards; %d queries",
        ctx.counts["num_docs"], len(files), len(shards), len(queries),
    )
    return ctx


def _vanished_files(storage: Storage, files: list[CorpusFile], corpus_path: str) -> dict:
    """Files of the latest run's corpus (same ``corpus.path``) that are gone or changed: logged and counted.

    Compared by path relative to the corpus root. A vanished file's shards are simply not in this run
    (its table has no rows from them); a changed file's shards get new ids and are scored again.
    """
    latest = catalog.read_latest(storage)
    if not latest:
        return {}
    try:
        corpus = storage.read_json(layout.run_manifest(storage.root, latest["run_id"]))["corpus"]
    except (FileNotFoundError, KeyError):
        return {}
    if corpus.get("path") != corpus_path:
        return {}
    before = corpus.get("files") or {}
    now = corpus_files_json(files)
    vanished = sorted(set(before) - set(now))
    changed = sorted(p for p in set(before) & set(now) if before[p]["fingerprint"] != now[p]["fingerprint"])
    if vanished:
        log.warning("%d corpus file(s) of run %s are gone and are not in this run, e.g. %s",
                    len(vanished), latest["run_id"], vanished[:5])
    if changed:
        log.info("%d corpus file(s) changed since run %s and are scored again, e.g. %s",
                 len(changed), latest["run_id"], changed[:5])
    return {"files_vanished": len(vanished), "vanished_files_sample": vanished[:20], "files_changed": len(changed),
            "files_added": len(set(now) - set(before))}


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
