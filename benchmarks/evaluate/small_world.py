"""The small world: a GPT-2 small enough for the exact oracle, kronfluence on it, and LDS.

- **oracle**: every method against the exact influence (dense damped
  empirical Fisher of the tracked layers); our EK-FAC against kronfluence
  when it is installed.
- **lds**: the linear datamodeling score over ``m`` random subsets of the
  training windows, each retrained from the same initialisation, with the
  seed-to-seed ceiling (the same subsets retrained with another seed).

Everything is attributed in float64, so differences are approximation
error, not rounding.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from benchmarks import metrics
from benchmarks.baselines import (
    BM25,
    KronfluenceUnavailable,
    exact_influence,
    kronfluence_available,
    kronfluence_pairwise,
)
from benchmarks.evaluate.config import EvaluateConfig, SmallWorldConfig
from benchmarks.evaluate.scoring import (
    SharedCaptureScorer,
    agreement,
    chance_scores,
    default_settings,
    method_table,
    repsim,
    score_settings,
)
from benchmarks.evaluate.world import DemoWorld, completion_logprobs
from pipeline.core.text import IGNORE, TokenWindow, encode_documents, encode_query
from pipeline.errors import ConfigError
from pipeline.tiny_lm import new_gpt2, train_on_windows

log = logging.getLogger(__name__)


def small_world_data(world: DemoWorld, cfg: SmallWorldConfig, seed: int) -> tuple[list[TokenWindow], list[TokenWindow]]:
    """Training windows (planted documents of the first facts, then filler) and queries (facts, held-out)."""
    tok = world.tokenizer
    facts = world.facts[: cfg.n_facts]
    planted = [d for f in facts for d in world.docs if d["id"] in set(f["gold_doc_ids"])]
    filler = [d for d in world.docs if not d.get("is_planted_for")]
    random.Random(seed).shuffle(filler)
    train: list[TokenWindow] = []
    next_filler = 0  # filler documents from here on were not used for training
    for i, doc in enumerate(planted + filler):
        if len(train) >= cfg.n_train:
            break
        seqs, _ = encode_documents(tok, [(doc["id"], doc["text"])], cfg.window)
        train.extend(seqs[: cfg.n_train - len(train)])
        next_filler = max(0, i + 1 - len(planted))
    queries = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], cfg.window) for f in facts]
    held_out = filler[next_filler:]
    for doc in held_out:
        if len(queries) >= len(facts) + cfg.n_heldout_queries:
            break
        seqs, _ = encode_documents(tok, [(doc["id"], doc["text"])], cfg.window)
        if not seqs or len(seqs[0].input_ids) < cfg.completion_tokens + 2:
            continue
        ids = seqs[0].input_ids
        labels = (IGNORE,) * (len(ids) - cfg.completion_tokens) + ids[-cfg.completion_tokens :]
        queries.append(TokenWindow(f"heldout-{doc['id']}", 0, ids, labels))
    if len(train) < cfg.n_train:
        raise ConfigError(f"the demo corpus gives only {len(train)} windows for small.n_train={cfg.n_train}; "
                          "lower small.n_train or raise demo.n_filler_docs")
    return train, queries


def small_world(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Exact oracle, kronfluence and LDS on a GPT-2 small enough for a dense Fisher."""
    started = time.perf_counter()
    sc = cfg.small
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    train, queries = small_world_data(world, sc, cfg.seed)
    query_ids = [q.doc_id for q in queries]

    def trained_model(subset: list[TokenWindow], seed: int):
        model = new_gpt2(len(tok), n_embd=sc.n_embd, n_layer=sc.n_layer, n_head=sc.n_head, n_positions=sc.window,
                         eos_id=tok.eos_token_id, pad_id=pad, seed=cfg.seed, n_inner=sc.n_inner)
        train_on_windows(model, subset, pad, epochs=sc.epochs, batch_size=sc.batch_size, lr=sc.lr, seed=seed,
                         device=device)
        return model

    model = trained_model(train, cfg.seed).to(torch.float64)
    trained = time.perf_counter()
    base = replace(cfg.influence(), precision="float64")
    scorer, scores = score_settings(model, base, default_settings(base), train, queries, pad, cfg.batch_size, device)
    emp, emp_scores = score_settings(model, replace(base, empirical_fisher=True), {}, train, queries, pad,
                                     cfg.batch_size, device)
    scores["ekfac_empirical"] = emp_scores["ekfac"]
    scores["repsim"] = repsim(model, tok, train, queries, device, cfg.batch_size)
    bm25 = BM25([tok.decode(list(s.input_ids)) for s in train])
    scores["bm25"] = np.stack([bm25.scores(tok.decode(list(q.input_ids))) for q in queries], 1)
    layers = scorer.full.layers
    n_params = sum(s.d_out * s.d_in for s in layers.values())
    result: dict[str, Any] = {
        "n_train": len(train), "n_queries": len(queries), "query_ids": query_ids, "window": sc.window,
        "model": {"n_embd": sc.n_embd, "n_layer": sc.n_layer, "n_inner": sc.n_inner, "tracked_params": n_params},
        "fisher": "empirical" if base.empirical_fisher else "sampled", "damping": base.damping,
    }
    result["kronfluence"] = _versus_kronfluence(cfg, model, scorer, scores, train, queries, pad, device)
    if sc.oracle:
        result["oracle"] = _versus_oracle(cfg, model, scorer, scores, train, queries, pad)
    result["timings_s"] = {"train": trained - started, "attribute": time.perf_counter() - trained}
    if sc.lds:
        result["lds"] = _lds(cfg, scores, train, queries, pad, device, trained_model)
    result["timings_s"]["total"] = time.perf_counter() - started
    return result


def _versus_kronfluence(cfg: EvaluateConfig, model, scorer: SharedCaptureScorer, scores: dict, train, queries,
                        pad: int, device) -> dict:
    """kronfluence's EK-FAC on the same model, data, Fisher kind and damping; adds ``scores["kronfluence"]``."""
    if not cfg.kronfluence:
        return {"available": False, "reason": "disabled by config (kronfluence=false)"}
    ok, reason = kronfluence_available()
    if not ok:
        return {"available": False, "reason": reason}
    base = scorer.base
    try:
        kron, timing = kronfluence_pairwise(
            model, list(scorer.full.layers), train, queries, pad, damping=base.damping,
            empirical_fisher=base.empirical_fisher, precision="float64", device=str(device),
            train_batch_size=cfg.batch_size, query_batch_size=cfg.batch_size, seed=cfg.seed)
    except KronfluenceUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    scores["kronfluence"] = ref = kron.T.numpy()
    rel = float(np.linalg.norm(scores["ekfac"] - ref) / max(np.linalg.norm(ref), 1e-300))
    return {
        "available": True, **agreement(scores["ekfac"], ref, cfg.small.top_k), "relative_error": rel,
        "seconds": timing,
        "note": "ours (projection off) vs kronfluence, same fisher kind and damping; with the sampled "
                "Fisher each side draws its own labels, so only rankings can agree exactly",
    }


def _versus_oracle(cfg: EvaluateConfig, model, scorer: SharedCaptureScorer, scores: dict, train, queries,
                   pad: int) -> dict:
    """Every method against the exact influence; adds ``scores["oracle"]`` when the model is small enough."""
    sc = cfg.small
    layers = scorer.full.layers
    n_params = sum(s.d_out * s.d_in for s in layers.values())
    if n_params > sc.max_params:
        return {"skipped": f"{n_params} tracked params > small.max_params={sc.max_params}"}
    oracle = exact_influence(model, layers, train, queries, pad, damping=scorer.base.damping,
                             max_params=sc.max_params).T.numpy()
    methods = {n: s for n, s in scores.items() if n != "oracle"}
    scores["oracle"] = oracle
    return {
        "definition": "g_q^T (F + lambda)^-1 g_n, F = dense empirical Fisher of the tracked layers "
                      "(autograd per-sequence gradients), lambda = 0.1 * mean diag per layer",
        "methods": method_table(methods, lambda s: agreement(s, oracle, sc.top_k),
                                oracle.shape, cfg.chance_draws, cfg.seed),
    }


def _lds(cfg: EvaluateConfig, scores: dict, train: list[TokenWindow], queries: list[TokenWindow], pad: int,
         device, trained_model) -> dict:
    """LDS of every method over random subsets retrained with ``trained_model(subset, seed)``."""
    started = time.perf_counter()
    sc = cfg.small
    query_ids = [q.doc_id for q in queries]
    rng = np.random.default_rng(cfg.seed + 12345)
    n, m = len(train), sc.lds_subsets
    size = max(1, round(sc.lds_fraction * n))
    masks = np.zeros((m, n))
    for j in range(m):
        masks[j, rng.choice(n, size, replace=False)] = 1
    measured = np.zeros((len(queries), m))
    measured_2 = np.zeros((len(queries), m)) if sc.lds_ceiling else None
    for j in range(m):
        subset = [train[i] for i in np.flatnonzero(masks[j])]
        measured[:, j] = completion_logprobs(trained_model(subset, cfg.seed), queries, pad, device)
        if measured_2 is not None:
            measured_2[:, j] = completion_logprobs(trained_model(subset, cfg.seed + 1), queries, pad, device)
        log.info("lds: retrained subset %d/%d", j + 1, m)
    per_method = {name: metrics.lds(s.T, masks, measured) for name, s in scores.items()}
    per_method["chance"] = metrics.nanmean(
        [metrics.lds(s.T, masks, measured) for s in chance_scores((n, len(queries)), cfg.chance_draws, cfg.seed)])
    ceiling = None
    if measured_2 is not None:
        ceiling = metrics.nanmean([metrics.spearman(measured[q], measured_2[q]) for q in range(len(queries))])
    by_kind = {}
    for kind, heldout in (("fact", False), ("heldout", True)):
        rows = [i for i, q in enumerate(query_ids) if q.startswith("heldout-") == heldout]
        if rows:
            by_kind[kind] = {name: metrics.lds(s.T[rows], masks, measured[rows]) for name, s in scores.items()}
    return {
        "definition": "per query, Spearman across subsets of sum_{i in S} score(q, i) vs log p(completion) "
                      "of the model retrained on S (same init and recipe); mean over queries",
        "subsets": m, "fraction": sc.lds_fraction, "epochs": sc.epochs,
        "methods": per_method,
        "by_query_kind": by_kind,
        "seed_to_seed_ceiling": ceiling,
        "measured_logprob_mean": float(measured.mean()),
        "measured_logprob_std_across_subsets": float(measured.std(axis=1).mean()),
        "seconds": time.perf_counter() - started,
    }
