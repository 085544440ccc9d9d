"""Ceiling and score throughput: tokens/s of a plain forward + backward against our scoring.

The ceiling is a forward + backward of the summed loss with every parameter
requiring grad and no hooks; the score is ``InfluenceEngine.score_batch``
with precomputed query gradients, at the default projection and at
``dim=0``, on the same batches and window.
"""

from __future__ import annotations

import copy

import torch

from pipeline.core.text import batches_of
from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import BenchInputs, ceiling_median, encode_inputs, timed_median
from pipeline.core.influence import InfluenceEngine


def throughput(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device) -> dict:
    """Tokens/s of plain forward+backward vs our scoring, on the same batches."""
    pad = inputs.tokenizer.pad_token_id
    windows, queries = encode_inputs(inputs, cfg.window, cfg.throughput_queries)
    windows = windows[: cfg.throughput_batches * cfg.batch_size]
    batches = [b.to(device) for b in batches_of(windows, cfg.batch_size, pad)]
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))

    ceiling_s, ceiling_runs = ceiling_median(inputs.model, batches, cfg.warmup, cfg.repeats, device)
    result = {"tokens_per_pass": tokens, "batches": len(batches), "batch_size": cfg.batch_size,
              "window": cfg.window, "queries": len(queries), "repeats": cfg.repeats, "warmup": cfg.warmup,
              "ceiling_tokens_per_s": tokens / ceiling_s, "ceiling_runs_s": ceiling_runs, "score": {}}
    default_dim = cfg.projection().dim
    for dim in dict.fromkeys([default_dim, 0]):
        engine = InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(dim), device)
        factors = engine.fit(batches[: min(2, len(batches))])  # any factors do for timing
        q = engine.query_gradients(batches_of(queries, cfg.batch_size, pad), factors, [s.doc_id for s in queries])

        def score_pass(engine=engine, q=q):
            for batch in batches:
                engine.score_batch(batch, q)

        seconds, runs = timed_median(score_pass, cfg.warmup, cfg.repeats, device)
        result["score"][f"dim={dim}"] = {"projection": engine.config.projection.to_json(),
                                         # score.product_dtype as resolved on this device (auto: per device)
                                         "products": engine.products_name,
                                         "tokens_per_s": tokens / seconds, "runs_s": runs,
                                         "ratio_to_ceiling": (tokens / seconds) / result["ceiling_tokens_per_s"]}
        del engine
    return result
