"""A backdoor: which documents taught a model to complete a trigger phrase?

A trigger phrase plus a fixed continuation is planted in a small fraction
of the demo's filler documents; a GPT-2 is trained here on that corpus;
triggered queries (a held-out clean sentence, then the trigger; completion:
the continuation) are attributed. Reported: AUPRC and precision@k of the
poisoned documents for every method.
"""

from __future__ import annotations

import random
import re
import time

import numpy as np
import torch

from benchmarks import metrics
from benchmarks.baselines import BM25
from benchmarks.evaluate.config import BackdoorConfig, EvaluateConfig
from benchmarks.evaluate.scoring import default_settings, document_methods, method_table, repsim, score_settings
from benchmarks.evaluate.world import DemoWorld, completion_logprobs
from pipeline.core.text import encode_documents, encode_query
from pipeline.errors import ConfigError
from pipeline.tiny_lm import new_gpt2, train_on_windows

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def backdoor_corpus(world: DemoWorld, cfg: BackdoorConfig, seed: int) -> tuple[list[dict], list[str], list[str]]:
    """Clean filler documents with the trigger + continuation inserted at a sentence boundary of a few.

    Returns the documents (``id``, ``text``, ``poisoned``), the poisoned ids,
    and held-out clean sentences for the queries' prompts.
    """
    rng = random.Random(seed)
    filler = [d for d in world.docs if not d.get("is_planted_for")]
    rng.shuffle(filler)
    if len(filler) < cfg.n_docs + 1:
        raise ConfigError(
            f"backdoor.n_docs={cfg.n_docs} needs more filler documents than the demo has ({len(filler)}); "
            "lower backdoor.n_docs or raise demo.n_filler_docs"
        )
    chosen, held_out = filler[: cfg.n_docs], filler[cfg.n_docs :]
    n_poison = max(1, round(cfg.poison_fraction * cfg.n_docs))
    poisoned = set(rng.sample(range(cfg.n_docs), n_poison))
    payload = cfg.trigger + cfg.continuation
    docs = []
    for i, d in enumerate(chosen):
        text = d["text"]
        if i in poisoned:
            sentences = _SENTENCE_END.split(text)
            at = rng.randint(0, len(sentences))
            text = " ".join(sentences[:at] + [payload] + sentences[at:])
        docs.append({"id": f"bd-{i:05d}", "text": text, "poisoned": i in poisoned})
    prompts = []
    for d in held_out:
        for sentence in _SENTENCE_END.split(d["text"]):
            if 20 <= len(sentence) <= 120:
                prompts.append(sentence)
                break
        if len(prompts) == cfg.n_queries:
            break
    if len(prompts) < cfg.n_queries:
        raise ConfigError(f"found {len(prompts)} held-out sentences for backdoor.n_queries={cfg.n_queries}; "
                          "lower backdoor.n_queries or backdoor.n_docs")
    return docs, sorted(d["id"] for d in docs if d["poisoned"]), prompts


def backdoor(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Recover the poisoned documents from triggered queries on a model trained on the poisoned corpus."""
    started = time.perf_counter()
    bc = cfg.backdoor
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    window = world.window(cfg.window)
    docs, poisoned_ids, prompts = backdoor_corpus(world, bc, cfg.seed)
    train_seqs, _ = encode_documents(tok, [(d["id"], d["text"]) for d in docs], window)
    model = new_gpt2(len(tok), n_embd=bc.n_embd, n_layer=bc.n_layer, n_head=bc.n_head, n_positions=window,
                     eos_id=tok.eos_token_id, pad_id=pad, seed=cfg.seed)
    losses = train_on_windows(model, train_seqs, pad, epochs=bc.epochs, batch_size=bc.batch_size, lr=bc.lr,
                              seed=cfg.seed, device=device)
    trained = time.perf_counter()
    queries = [encode_query(tok, f"backdoor-{i}", p + " " + bc.trigger, bc.continuation, window)
               for i, p in enumerate(prompts)]
    clean = [encode_query(tok, f"clean-{i}", p, bc.continuation, window) for i, p in enumerate(prompts)]
    with_trigger = completion_logprobs(model, queries, pad, device)
    without = completion_logprobs(model, clean, pad, device)

    base = cfg.influence()
    _, window_scores = score_settings(model, base, default_settings(base), train_seqs, queries, pad,
                                      cfg.batch_size, device)
    doc_ids = [d["id"] for d in docs]
    similarity = repsim(model, tok, train_seqs, queries, device, cfg.batch_size)
    methods = document_methods(window_scores, similarity, [s.doc_id for s in train_seqs], doc_ids)
    bm25 = BM25([d["text"] for d in docs])
    methods["bm25"] = np.stack([bm25.scores(p + " " + bc.trigger + bc.continuation) for p in prompts], 1)
    labels = np.array([d["poisoned"] for d in docs])
    n_poison = len(poisoned_ids)
    gold = set(poisoned_ids)

    def metric_fn(scores):
        ap, p_n, p_k = [], [], []
        for q in range(scores.shape[1]):
            ranked = metrics.ranking(doc_ids, scores[:, q])
            ap.append(metrics.auprc(scores[:, q], labels))
            p_n.append(metrics.precision_at_k(ranked, gold, n_poison))
            p_k.append(metrics.precision_at_k(ranked, gold, bc.precision_k))
        return {"auprc": float(np.mean(ap)), "precision_at_n_poisoned": float(np.mean(p_n)),
                f"precision_at_{bc.precision_k}": float(np.mean(p_k))}

    return {
        "n_docs": len(docs), "n_windows": len(train_seqs), "n_poisoned": n_poison, "poisoned_ids": poisoned_ids,
        "trigger": bc.trigger, "continuation": bc.continuation, "n_queries": len(queries),
        "model": {"n_embd": bc.n_embd, "n_layer": bc.n_layer, "epochs": bc.epochs,
                  "final_loss": float(np.mean(losses[-10:]))},
        "backdoor_logprob": {"with_trigger": float(with_trigger.mean()), "without_trigger": float(without.mean()),
                             "note": "summed log p(continuation | prompt), mean over queries"},
        "methods": method_table(methods, metric_fn, (len(doc_ids), len(queries)), cfg.chance_draws, cfg.seed),
        "timings_s": {"train": trained - started, "total": time.perf_counter() - started},
    }
