"""Top-10 overlap with exact EK-FAC of rank-r query gradients on the speed benchmark's SmolLM2 inputs.

The third check of the default query rank (docs/figures.md, "Rank on the
benchmark's data"): the inputs ``jobs/benchmark.py model.preset=smollm2``
builds (``benchmarks.speed.inputs``), the first ``--windows`` windows and
``--queries`` queries, empirical Fisher, all tracked layers of the
attribution job's defaults; exact = projection off with dense queries, every
rank scored from the same captures (``fidelity_scores``). Dense query
gradients take 318 MB each on SmolLM2's 90 MLP layers, and the shared
captures about 0.75 MB per token: 64 windows x 16 queries peak near 14 GiB.

    python -m benchmarks.evaluate.rank_check --windows 64 --queries 16 --ranks 8 16 32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.evaluate.scoring import agreement
from benchmarks.evaluate.sweep import Setting, fidelity_scores
from benchmarks.speed.config import BenchmarkConfig, BenchModelConfig
from benchmarks.speed.inputs import encode_inputs, prepare_inputs
from pipeline.config import AttributeConfig
from pipeline.core.influence import InfluenceConfig
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import batches_of


def main(argv: list[str] | None = None) -> dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--n-docs", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args(argv)
    cfg = BenchmarkConfig(model=BenchModelConfig(preset="smollm2"), n_docs=args.n_docs, window=args.window,
                          query_counts=[args.queries])
    with tempfile.TemporaryDirectory() as work:
        inputs = prepare_inputs(cfg, work)
        train, queries = encode_inputs(inputs, args.window, args.queries)
        train = train[: args.windows]
        print(f"{len(train)} windows, {sum(len(t.input_ids) for t in train)} tokens, {len(queries)} queries")
        d = AttributeConfig()
        base = InfluenceConfig(modules=d.model.modules, damping=d.factors.damping, empirical_fisher=True)
        settings = [Setting("exact", ProjectionSpec(0))]
        settings += [Setting(f"rank{r}", ProjectionSpec(0), r) for r in args.ranks]
        pad = inputs.tokenizer.pad_token_id
        started = time.perf_counter()
        scores, _ = fidelity_scores(inputs.model, base, settings, batches_of(train, 8, pad),
                                    batches_of(queries, 8, pad), [q.doc_id for q in queries], torch.device("cpu"))
    print(f"scored in {time.perf_counter() - started:.0f} s")
    out = {}
    for r in args.ranks:
        out[r] = agreement(scores[f"rank{r}"], scores["exact"], 10)
        print(f"rank {r}: top-10 overlap {out[r]['topk_overlap']:.3f}, Spearman {out[r]['spearman']:.3f} "
              f"(worst query {out[r]['spearman_min']:.3f})")
    return out


if __name__ == "__main__":
    main()
