"""Planted facts and projection fidelity, both on the demo model from one shared scoring pass.

- **facts**: for each fact the model learned, strict recall@|gold|, recall@k
  and MRR of its gold documents, overall and by number of copies. Document
  scores: the sum of the document's window scores for influence and
  gradient dot product (window losses add up to the document loss), the
  maximum for similarities (RepSim, gradient cosine), BM25 on the whole
  document.
- **fidelity**: Spearman and top-k overlap of every projection setting
  (``sketch`` / ``curvature`` x dims) against unprojected EK-FAC, with a
  recommended default.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from benchmarks import metrics
from benchmarks.baselines import BM25
from pipeline.core.text import batches_of
from benchmarks.evaluate.config import EvaluateConfig
from benchmarks.evaluate.scoring import (
    SharedCaptureScorer,
    agreement,
    default_settings,
    document_methods,
    method_table,
    projected_size,
    repsim,
)
from benchmarks.evaluate.world import DemoWorld
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import encode_documents, encode_query


def facts_and_fidelity(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Planted-facts retrieval and projection fidelity on the demo model (one shared scoring pass)."""
    started = time.perf_counter()
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    window = world.window(cfg.window)
    doc_ids = [d["id"] for d in world.docs]
    train_seqs, skipped = encode_documents(tok, [(d["id"], d["text"]) for d in world.docs], window)
    facts = [dict(f, _column=i) for i, f in enumerate(world.facts)]
    query_seqs = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], window) for f in facts]
    base = cfg.influence()
    default_spec = base.projection
    settings = default_settings(base)
    if cfg.fidelity.enabled:
        for mode in cfg.fidelity.modes:
            for dim in cfg.fidelity.dims:
                settings[f"{mode}-{int(dim)}"] = ProjectionSpec(int(dim), default_spec.seed, mode)
    scorer = SharedCaptureScorer(world.model, base, settings, device)
    train_batches = batches_of(train_seqs, cfg.batch_size, pad)
    query_batches = batches_of(query_seqs, cfg.batch_size, pad)
    scorer.fit(train_batches)
    fitted = time.perf_counter()
    window_scores = scorer.score(train_batches, scorer.query_gradients(query_batches, [q.doc_id for q in query_seqs]))
    scored = time.perf_counter()
    if not default_spec.enabled:
        window_scores["ekfac_projected"] = window_scores["ekfac"]
    result: dict[str, Any] = {
        "model": {"path": world.artifacts.model_dir, "spec": asdict(world.spec)},
        "n_docs": len(doc_ids), "n_windows": len(train_seqs), "window": window, "n_skipped_docs": len(skipped),
        "timings_s": {"fit": fitted - started, "score_all_settings": scored - fitted},
    }
    if cfg.facts.enabled:
        similarity = repsim(world.model, tok, train_seqs, query_seqs, device, cfg.batch_size)
        methods = document_methods(window_scores, similarity, [s.doc_id for s in train_seqs], doc_ids)
        bm25 = BM25([d["text"] for d in world.docs])
        methods["bm25"] = np.stack([bm25.scores(f["prompt"] + f["completion"]) for f in facts], 1)
        result["facts"] = _facts_section(cfg, methods, doc_ids, facts, default_spec)
    if cfg.fidelity.enabled:
        result["fidelity"] = _fidelity_section(cfg, scorer, window_scores, len(train_seqs), len(query_seqs))
    result["timings_s"]["total"] = time.perf_counter() - started
    return result


def _facts_section(cfg: EvaluateConfig, methods: dict[str, np.ndarray], doc_ids: list[str], facts: list[dict],
                   projection: ProjectionSpec) -> dict:
    """Every method's retrieval of the gold documents, over the learned facts and over all of them."""
    learned = [f for f in facts if f.get("learned")]
    k = cfg.facts.recall_k

    def metric_fn(scores):
        return {"learned": ranking_metrics(scores, doc_ids, learned, k),
                "all": ranking_metrics(scores, doc_ids, facts, k)}

    return {
        "n_facts": len(facts),
        "n_learned": len(learned),
        "learned_by_copies": {str(c): [sum(1 for f in facts if f["copies"] == c and f.get("learned")),
                                       sum(1 for f in facts if f["copies"] == c)]
                              for c in sorted({f["copies"] for f in facts})},
        "recall_k": k,
        "projection": projection.to_json(),
        "methods": method_table(methods, metric_fn, (len(doc_ids), len(facts)), cfg.chance_draws, cfg.seed),
        "note": "metrics under 'learned' are the headline (facts the model learned); 'all' includes the rest",
    }


def _fidelity_section(cfg: EvaluateConfig, scorer: SharedCaptureScorer, window_scores: dict[str, np.ndarray],
                      n_windows: int, n_queries: int) -> dict:
    """Every projection setting's agreement with unprojected EK-FAC, and the recommended one."""
    k = cfg.fidelity.top_k
    rows = []
    for mode in cfg.fidelity.modes:
        for dim in cfg.fidelity.dims:
            name = f"{mode}-{int(dim)}"
            row = {"mode": mode, "dim": int(dim), "projected_size": projected_size(scorer.engines[name])}
            row.update(agreement(window_scores[name], window_scores["ekfac"], k))
            rows.append(row)
    return {
        "reference": "ekfac (projection off, same factors data and labels)",
        "full_size": projected_size(scorer.full),
        "n_windows": n_windows, "n_queries": n_queries,
        "settings": rows,
        "recommended": recommend_projection(rows, cfg.fidelity.target_spearman),
    }


def ranking_metrics(scores: np.ndarray, doc_ids: list[str], facts: list[dict], k: int) -> dict:
    """Mean strict recall, recall@k and MRR over ``facts`` (columns of ``scores`` in fact order), by copies."""
    rows = []
    for fact in facts:
        ranked = metrics.ranking(doc_ids, scores[:, fact["_column"]])
        gold = set(fact["gold_doc_ids"])
        rows.append((fact["copies"], metrics.strict_recall(ranked, gold), metrics.recall_at_k(ranked, gold, k),
                     metrics.mrr(ranked, gold)))

    def summary(subset):
        if not subset:
            return {"n_facts": 0, "strict_recall": None, f"recall_at_{k}": None, "mrr": None}
        return {
            "n_facts": len(subset),
            "strict_recall": float(np.mean([r[1] for r in subset])),
            f"recall_at_{k}": float(np.mean([r[2] for r in subset])),
            "mrr": float(np.mean([r[3] for r in subset])),
        }

    out = summary(rows)
    out["by_copies"] = {str(c): summary([r for r in rows if r[0] == c]) for c in sorted({r[0] for r in rows})}
    return out


def recommend_projection(rows: list[dict], target: float) -> dict:
    """The mode that wins at most dims (by Spearman, ties by overlap), and its smallest dim reaching ``target``."""
    dims = sorted({r["dim"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    by = {(r["mode"], r["dim"]): r for r in rows}
    wins = {m: 0 for m in modes}
    for d in dims:
        present = [m for m in modes if (m, d) in by and by[(m, d)]["spearman"] is not None]
        if present:
            best = max(present, key=lambda m: (by[(m, d)]["spearman"], by[(m, d)]["topk_overlap"]))
            wins[best] += 1
    mode = max(modes, key=lambda m: (wins[m], metrics.nanmean([by[(m, d)]["spearman"] for d in dims if (m, d) in by])))
    reaching = [d for d in dims if (mode, d) in by and (by[(mode, d)]["spearman"] or -1) >= target]
    dim = reaching[0] if reaching else dims[-1]
    return {"mode": mode, "dim": dim, "wins_by_mode": wins, "target_spearman": target,
            "reached_target": bool(reaching), **{k: by[(mode, dim)][k] for k in ("spearman", "topk_overlap")}}
