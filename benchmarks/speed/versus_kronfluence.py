"""Ours against kronfluence: wall time of the whole attribution and the overlap of the two top-k.

kronfluence's EK-FAC fit + pairwise scores against ours: fit + precondition
+ score + merge through ``pipeline.run.run_attribution`` on a local Ray
(``ours=pipeline``), or the in-process core (``ours=core``, labelled so), at
each query count. End-to-end runs take ``pipeline_repeats`` runs each.
With ``max_documents`` leaving documents out, kronfluence fits on the
windows of the documents our job samples (as its own 100,000-example caps
would fit it on a larger corpus) and both score every window. With
``kronfluence_longest_first`` kronfluence runs again on the same windows
batched longest first, as our workers batch them (a second speedup);
``kronfluence_corpus_order=false`` leaves out the corpus-order run.

Ours' fit is also put in ceiling passes (``fit_ceiling_passes``): its
stage seconds over one ``Ceiling`` pass on the windows it fits on
(``fit_ceiling``).
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import torch

from benchmarks import metrics
from benchmarks.baselines import kronfluence_available, kronfluence_pairwise
from pipeline.core.text import batches_of, longest_first
from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import BenchInputs, ceiling_median, encode_inputs, write_corpus
from pipeline import heap
from pipeline.config import AttributeConfig
from pipeline.context import prepare
from pipeline.corpus import read_shard
from pipeline.core.influence import InfluenceEngine
from pipeline.core.topk import TopK
from pipeline.run import run_attribution

OURS_LABELS = {
    "pipeline": "pipeline: run_attribution on a local Ray (validate, start workers, fit, precondition, score, merge)",
    "core": "in-process core: fit + precondition + score + top-k, no Ray and no I/O",
}


def attribute_config(cfg: BenchmarkConfig, inputs: BenchInputs, n_queries: int, root: str, run_id: str,
                     dim: int | None, num_workers: int, device: torch.device) -> AttributeConfig:
    """The attribution job's defaults pointed at the benchmark's model, corpus and queries."""
    a = AttributeConfig()
    a.model.path, a.corpus.path, a.queries.path = inputs.model_dir, inputs.corpus_path, inputs.queries_paths[n_queries]
    a.storage.root, a.run.id = root, run_id
    a.corpus.window = cfg.window
    a.corpus.docs_per_shard = cfg.docs_per_shard
    a.score.batch_size = a.factors.batch_size = cfg.batch_size
    a.score.top_k = cfg.top_k
    spec = cfg.projection()
    a.projection.mode = spec.mode
    a.projection.dim = spec.dim if dim is None else dim
    a.score.query_rank = cfg.score_query_rank()
    a.score.product_dtype = cfg.score_product_dtype()
    if cfg.lambda_sample is not None:
        a.factors.lambda_sample = float(cfg.lambda_sample)
    if cfg.lambda_max_documents is not None:
        a.factors.lambda_max_documents = int(cfg.lambda_max_documents)
    if cfg.max_documents is not None:
        a.factors.max_documents = int(cfg.max_documents)
    a.factors.empirical_fisher = cfg.fisher_empirical()
    a.cluster.num_workers = num_workers
    if device.type == "cuda":
        a.cluster.gpus_per_worker = 1.0 / num_workers
    return a


def ours_pipeline(cfg, inputs, n_queries, dim, work, tag, device, num_workers=None, corpus_path=None) -> dict:
    """One end-to-end ``run_attribution`` in fresh storage: wall seconds, stage timings, top-k per query."""
    root = tempfile.mkdtemp(prefix=f"run-{tag}-", dir=work)
    a = attribute_config(cfg, inputs, n_queries, root, f"bench-{tag}", dim,
                         num_workers or AttributeConfig().cluster.num_workers, device)
    if corpus_path:
        a.corpus.path = corpus_path
    started = time.perf_counter()
    manifest = run_attribution(a)
    seconds = time.perf_counter() - started
    table = ds.dataset(manifest["attribution"], format="parquet").to_table()
    topk: dict[str, set] = {}
    for row in table.to_pylist():
        if row["polarity"] == "proponent" and row["rank"] <= cfg.top_k:
            topk.setdefault(row["query_id"], set()).add((row["doc_id"], row["window"]))
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds, "timings": manifest.get("timings", {}), "counts": manifest.get("counts", {}),
            "topk": topk, "num_workers": a.cluster.num_workers}


def ours_core(cfg, inputs, n_queries, dim, device) -> dict:
    """The in-process core: fit + precondition + score every window + running top-k (no Ray, no I/O)."""
    pad = inputs.tokenizer.pad_token_id
    started = time.perf_counter()
    windows, queries = encode_inputs(inputs, cfg.window, n_queries)
    engine = InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(dim), device)
    batches = batches_of(windows, cfg.batch_size, pad)
    factors = engine.fit(batches)
    fitted = time.perf_counter()
    q = engine.query_gradients(batches_of(queries, cfg.batch_size, pad), factors, [s.doc_id for s in queries])
    preconditioned = time.perf_counter()
    acc = TopK(len(queries), cfg.top_k)
    for i, batch in enumerate(batches):
        keys = torch.arange(i * cfg.batch_size, i * cfg.batch_size + batch.input_ids.shape[0])
        acc.update(engine.score_batch(batch, q), keys)
    scored = time.perf_counter()
    topk = {s.doc_id: {(windows[k].doc_id, windows[k].window) for _, k in acc.proponents(i)}
            for i, s in enumerate(queries)}
    return {"seconds": scored - started,
            "timings": {"fit_s": fitted - started, "precondition_s": preconditioned - fitted,
                        "score_s": scored - preconditioned},
            "counts": {"num_windows": len(windows)}, "topk": topk}


def fitting_documents(cfg: BenchmarkConfig, inputs: BenchInputs, n_queries: int, work: str,
                      device: torch.device) -> set[str] | None:
    """The ids of the documents our runs fit on when ``max_documents`` leaves some out (None: every one).

    Taken from the attribution job's own validation of the benchmark's corpus
    (``pipeline.context.prepare``: the fewest shards in hash order that hold
    the cap), so that kronfluence's fit, given these documents' windows, is
    capped the way its ``covariance_max_examples`` / ``lambda_max_examples``
    cap it on a corpus past 100,000 examples, on the same documents as ours.
    """
    if not cfg.max_documents:
        return None
    root = tempfile.mkdtemp(prefix="sample-", dir=work)
    try:
        a = attribute_config(cfg, inputs, n_queries, root, "bench-sample", None, 1, device)
        ctx = prepare(a)
        if not ctx.binding_max_documents:
            return None
        return {doc_id for shard in ctx.sample_shards
                for doc_id, _ in read_shard(shard, a.corpus.id_column, a.corpus.text_column, a.storage.options)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fit_ceiling(cfg: BenchmarkConfig, inputs: BenchInputs, fit_docs: set[str] | None, device: torch.device) -> dict:
    """One ceiling pass over the windows ours fits on: the unit of ``fit_ceiling_passes``.

    The windows of every document, or of the capped sample's (``fit_docs``),
    batched longest first by ``batch_size`` over all of them (the workers
    sort each shard's windows, which pads a little more: the ratio errs
    high). Timed in this process with the benchmark's ``threads``, where the
    pipeline fits in its workers: median of ``repeats`` after ``warmup``.
    """
    windows, _ = encode_inputs(inputs, cfg.window, int(cfg.query_counts[0]))
    if fit_docs is not None:
        windows = [w for w in windows if w.doc_id in fit_docs]
    windows = [windows[i] for i in longest_first(windows)]
    batches = [b.to(device) for b in batches_of(windows, cfg.batch_size, inputs.tokenizer.pad_token_id)]
    seconds, runs = ceiling_median(inputs.model, batches, cfg.warmup, cfg.repeats, device)
    return {"seconds": seconds, "runs_s": runs, "windows": len(windows), "batch_size": cfg.batch_size,
            "tokens": int(sum(int(b.attention_mask.sum()) for b in batches))}


def _tracked_layers(cfg: BenchmarkConfig, inputs: BenchInputs) -> list[str]:
    """Names of the layers ours tracks (found on a CPU copy), for kronfluence to track the same."""
    return list(InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(0), "cpu").layers)


def _warm_up(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str, with_kronfluence: bool):
    """Untimed small runs of both, so imports, library initialisation and caches are not counted."""
    small_corpus = os.path.join(work, "warmup-corpus.parquet")
    write_corpus(small_corpus, [t for _, t in inputs.docs], min(cfg.n_docs, 2 * cfg.batch_size))
    if cfg.ours == "pipeline":
        ours_pipeline(cfg, inputs, cfg.throughput_queries, None, work, "warmup", device, corpus_path=small_corpus)
    if with_kronfluence:
        windows, queries = encode_inputs(inputs, cfg.window, cfg.throughput_queries)
        kronfluence_pairwise(inputs.model, _tracked_layers(cfg, inputs), windows[: 2 * cfg.batch_size], queries[:1],
                             inputs.tokenizer.pad_token_id, device=str(device), train_batch_size=cfg.batch_size,
                             query_batch_size=1)


def versus_kronfluence(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str, notes: dict) -> dict:
    """Seconds of ours (default projection and dim 0) and of kronfluence at each query count, and top-k overlap."""
    kron_ok, kron_reason = kronfluence_available() if cfg.kronfluence else (False, "disabled by config")
    if not kron_ok:
        notes["kronfluence"] = kron_reason
    default_dim = cfg.projection().dim
    dims = list(dict.fromkeys([default_dim] + ([0] if cfg.compare_dim0 else [])))
    out: dict[str, Any] = {"ours_method": OURS_LABELS[cfg.ours], "pipeline_repeats": cfg.pipeline_repeats,
                           "by_queries": {}}
    if cfg.warmup > 0:
        started = time.perf_counter()
        _warm_up(cfg, inputs, device, work, kron_ok)
        out["warmup_s"] = time.perf_counter() - started
    # The documents our pipeline fits on (None: all); kronfluence's fit gets the same. The in-process core fits on all.
    sample = fitting_documents(cfg, inputs, int(cfg.query_counts[0]), work, device)
    out["fit_ceiling"] = fit_ceiling(cfg, inputs, sample if cfg.ours == "pipeline" else None, device)
    heap.release()  # the ceiling's model copy and gradients, before the workers start
    for n_queries in [int(q) for q in cfg.query_counts]:
        point: dict[str, Any] = {"ours": {}}
        for dim in dims:
            runs = []
            for r in range(cfg.pipeline_repeats):
                tag = f"q{n_queries}-d{dim}-r{r}"
                runs.append(ours_pipeline(cfg, inputs, n_queries, dim, work, tag, device) if cfg.ours == "pipeline"
                            else ours_core(cfg, inputs, n_queries, dim, device))
            point["ours"][f"dim={dim}"] = {
                "seconds": statistics.median(r["seconds"] for r in runs), "runs_s": [r["seconds"] for r in runs],
                "fit_ceiling_passes": statistics.median(r["timings"]["fit_s"] for r in runs)
                / out["fit_ceiling"]["seconds"],
                "stage_timings": runs[-1]["timings"], "num_windows": runs[-1]["counts"].get("num_windows"),
                "_topk": runs[-1]["topk"],
            }
        if kron_ok:
            _kronfluence_point(cfg, inputs, n_queries, device, point, sample)
        for ours in point["ours"].values():
            ours.pop("_topk")
        out["by_queries"][str(n_queries)] = point
    out["dims"] = dims
    return out


def _kronfluence_point(cfg: BenchmarkConfig, inputs: BenchInputs, n_queries: int, device: torch.device,
                       point: dict, fit_docs: set[str] | None = None) -> None:
    """Time kronfluence at ``n_queries``; add its seconds to ``point`` and ours' overlap and speedup against it.

    ``fit_docs``: fit its factors on these documents' windows only (our capped sample); scores cover every window.
    ``kronfluence_corpus_order`` times it on the windows in corpus order (``kronfluence`` in ``point``),
    ``kronfluence_longest_first`` on the same windows batched longest first (``kronfluence_longest_first``);
    ours' top-k overlap is against the corpus-order run where there is one, else the longest-first one.
    """
    windows, queries = encode_inputs(inputs, cfg.window, n_queries)
    fit_windows = None if fit_docs is None else [w for w in windows if w.doc_id in fit_docs]
    scores = None
    if cfg.kronfluence_corpus_order:
        point["kronfluence"], scores = _time_kronfluence(cfg, inputs, windows, queries, fit_windows, device)
    if cfg.kronfluence_longest_first:
        by_length = longest_first(windows)
        fit_sorted = None if fit_windows is None else [fit_windows[i] for i in longest_first(fit_windows)]
        timed, permuted = _time_kronfluence(cfg, inputs, [windows[i] for i in by_length], queries, fit_sorted, device)
        sorted_scores = torch.empty_like(permuted)
        sorted_scores[:, by_length] = permuted
        if scores is not None:
            # The same scores up to rounding (and the label draws, with sampled labels): a check the columns went back.
            timed["max_abs_difference_vs_corpus_order"] = float((sorted_scores - scores).abs().max())
            timed["max_abs_score"] = float(scores.abs().max())
        else:
            scores = sorted_scores
        point["kronfluence_longest_first"] = timed
    theirs = {}
    for qi, query in enumerate(queries):
        order = metrics.rank_order(scores[qi].numpy())[: cfg.top_k]
        theirs[query.doc_id] = {(windows[i].doc_id, windows[i].window) for i in order if scores[qi, i] > 0}
    for ours in point["ours"].values():
        overlaps = [len(ours["_topk"].get(qid, set()) & top) / cfg.top_k for qid, top in theirs.items()]
        ours["topk_overlap_vs_kronfluence"] = float(np.mean(overlaps))
        for key in ("kronfluence", "kronfluence_longest_first"):
            if key in point:
                ours[key.replace("kronfluence", "speedup_vs_kronfluence")] = point[key]["seconds"] / ours["seconds"]


def _time_kronfluence(cfg: BenchmarkConfig, inputs: BenchInputs, windows: list, queries: list, fit_windows: list | None,
                      device: torch.device) -> tuple[dict, torch.Tensor]:
    """kronfluence's fit + pairwise scores over ``windows`` in the order given (``pipeline_repeats`` runs, median)."""
    layers = _tracked_layers(cfg, inputs)
    defaults = AttributeConfig().factors
    kruns, scores = [], None
    for _ in range(cfg.pipeline_repeats):
        started = time.perf_counter()
        scores, parts = kronfluence_pairwise(
            inputs.model, layers, windows, queries, inputs.tokenizer.pad_token_id, damping=defaults.damping,
            empirical_fisher=cfg.fisher_empirical(), precision="float32", device=str(device),
            train_batch_size=cfg.batch_size, query_batch_size=min(len(queries), 32), fit_train=fit_windows)
        kruns.append((time.perf_counter() - started, parts))
    timed = {"seconds": statistics.median(k[0] for k in kruns), "runs_s": [k[0] for k in kruns],
             "fit_s": kruns[-1][1]["fit_s"], "score_s": kruns[-1][1]["score_s"],
             "fit_windows": len(windows if fit_windows is None else fit_windows), "windows": len(windows)}
    return timed, scores
