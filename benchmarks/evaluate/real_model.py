"""The evaluation on a real pretrained model: SmolLM2-135M fine-tuned on planted facts (``world=smollm2``).

The world is ``benchmarks.smollm2_facts`` (built once and cached; reused
here). Two results from one sweep (``benchmarks.evaluate.sweep``):

- **fidelity and cost**: every setting (exact, query ranks, sketch and
  curvature at each dim) against exact EK-FAC, with score-stage speed
  relative to the ceiling, fit cost in ceiling passes and peak RSS, and the
  default chosen by the rule (``choose_default``);
- **planted facts**: document-level recall@k, strict recall and MRR of each
  fact's planted documents for every swept setting, gradient dot product and
  cosine, and BM25 (whole document, ``prompt + completion`` as the query),
  with a chance row.

Documents are tokenised as the attribution job does by default
(``resolve_tokenisation``: the tokenizer's BOS habit, EOS appended).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from benchmarks.baselines import BM25
from pipeline.core.text import batches_of
from benchmarks.evaluate.config import EvaluateConfig
from benchmarks.evaluate.facts import ranking_metrics
from benchmarks.evaluate.scoring import doc_scores, method_table
from benchmarks.evaluate.sweep import choose_default, run_sweep, sweep_settings
from pipeline.core.text import encode_documents, encode_query, resolve_tokenisation
from pipeline.model_io import load_model_and_tokenizer

log = logging.getLogger(__name__)


def load_facts_world(cfg: EvaluateConfig):
    """``(artifacts, docs, facts)`` of the SmolLM2 planted-facts build (built under ``smollm2.cache_dir`` if absent).

    With ``smollm2.max_docs`` > 0, the corpus is cut to the planted documents
    first, then documentation paragraphs, up to that many (a smaller run).
    """
    from benchmarks.smollm2_facts import FactsSpec, build_smollm2_facts

    artifacts = build_smollm2_facts(cfg.smollm2.cache_dir, FactsSpec())
    with open(artifacts.corpus_path) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    with open(artifacts.facts_path) as f:
        facts = json.load(f)
    if cfg.smollm2.max_docs:
        planted = [d for d in docs if d["is_planted_for"]]
        keep = {d["id"] for d in (planted + [d for d in docs if not d["is_planted_for"]])[: cfg.smollm2.max_docs]}
        docs = [d for d in docs if d["id"] in keep]
    return artifacts, docs, facts


def smollm2_section(cfg: EvaluateConfig, device: torch.device, on_setting=None, on_fidelity=None) -> dict:
    """The sweep, the chosen default and the planted-facts table on the SmolLM2 facts world."""
    started = time.perf_counter()
    artifacts, docs, facts = load_facts_world(cfg)
    model, tok = load_model_and_tokenizer(artifacts.model_dir)
    tokenisation = resolve_tokenisation(tok, None, None)
    window = cfg.window or 128
    train, skipped = encode_documents(tok, [(d["id"], d["text"]) for d in docs], window, tokenisation)
    query_seqs = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], window, tokenisation)
                  for f in facts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    base = cfg.influence()
    sc = cfg.smollm2
    settings = sweep_settings(sc.modes, sc.dims, sc.query_ranks, base.projection.seed)
    log.info("SmolLM2 facts: %d documents, %d windows of <= %d tokens, %d queries, %d settings",
             len(docs), len(train), window, len(facts), len(settings))
    sweep = run_sweep(model, base, settings, batches_of(train, cfg.batch_size, pad),
                      batches_of(query_seqs, cfg.batch_size, pad), [f["fact_id"] for f in facts], device,
                      sc.top_k, sc.cost_batches, on_setting, on_fidelity)
    chosen = choose_default(sweep["rows"], sc.min_topk_overlap)

    doc_ids = [d["id"] for d in docs]
    window_docs = [w.doc_id for w in train]
    methods = {name: doc_scores(sweep["scores"][name], window_docs, doc_ids, "sum")
               for name in [s.name for s in settings] + ["grad_dot"]}
    methods["grad_cos"] = doc_scores(sweep["scores"]["grad_cos"], window_docs, doc_ids, "max")
    bm25 = BM25([d["text"] for d in docs])
    methods["bm25"] = np.stack([bm25.scores(f["prompt"] + f["completion"]) for f in facts], 1)
    present = set(doc_ids)
    # With max_docs, a fact whose planted documents were all cut is left out of the metrics.
    cols = [dict(f, _column=i, copies=len(f["gold_doc_ids"]),
                 gold_doc_ids=[g for g in f["gold_doc_ids"] if g in present]) for i, f in enumerate(facts)]
    cols = [f for f in cols if f["gold_doc_ids"]]
    k = cfg.facts.recall_k
    with open(artifacts.logprobs_path) as f:
        logprobs = json.load(f)
    result: dict[str, Any] = {
        "model_dir": artifacts.model_dir, "n_docs": len(docs), "n_windows": len(train), "window": window,
        "n_skipped_docs": len(skipped), "n_queries": len(facts), "tokenisation": tokenisation.to_json(),
        "ekfac_base": {"damping": base.damping, "empirical_fisher": base.empirical_fisher,
                       "precision": base.precision, "modules": base.modules},
        "logprob_summary": logprobs.get("summary"),
        "ceiling": sweep["ceiling"],
        "fidelity_windows": sweep["fidelity_windows"], "cost_windows": sweep["cost_windows"],
        "settings": sweep["rows"],
        "chosen_default": chosen,
        "facts": {
            "recall_k": k, "n_facts": len(cols),
            "gold": "each fact's planted documents (document level; window scores summed, max for cosine)",
            "methods": method_table(methods, lambda s: ranking_metrics(s, doc_ids, cols, k),
                                    (len(doc_ids), len(facts)), cfg.chance_draws, cfg.seed),
        },
        "config": asdict(sc),
    }
    result["seconds"] = time.perf_counter() - started
    return result
