"""Top-10 overlap with exact EK-FAC of rank-r query gradients on SmolLM2 (the speed benchmark's inputs, or --data).

The third check of the default query rank (docs/figures.md, "Rank on the
benchmark's data"): the inputs ``jobs/benchmark.py model.preset=smollm2``
builds (``benchmarks.speed.inputs``), the first ``--windows`` windows and
``--queries`` queries, empirical Fisher, all tracked layers of the
attribution job's defaults; exact = projection off with dense queries, every
rank scored from the same captures (``fidelity_scores``). Dense query
gradients take 318 MB each on SmolLM2's 90 MLP layers, and the shared
captures about 0.75 MB per token: 64 windows x 16 queries peak near 14 GiB.

With ``--timed-queries N`` each rank's score pass is also timed, side by
side with the ceiling (plain forward + backward with every weight's
gradient): the first ``--timed-batches`` batches of 8 windows against the
queries repeated to ``N``, with the job's default products
(``score.product_dtype``), medians of ``--repeats`` alternating repeats.

    python -m benchmarks.evaluate.rank_check --windows 64 --queries 16 --ranks 8 16 32
    python -m benchmarks.evaluate.rank_check --windows 64 --queries 16 --ranks 16 24 32 --timed-queries 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.evaluate.scoring import agreement, repeated_queries
from benchmarks.evaluate.check_inputs import add_input_arguments, load_inputs
from benchmarks.evaluate.sweep import Setting, fidelity_scores
from benchmarks.speed.inputs import Ceiling
from pipeline.config import AttributeConfig
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec


def main(argv: list[str] | None = None) -> dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--timed-queries", type=int, default=0, help="time each rank's score pass (0: no)")
    parser.add_argument("--timed-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    inputs = load_inputs(args)
    print(inputs.describe())
    d = AttributeConfig()
    base = InfluenceConfig(modules=d.model.modules, damping=d.factors.damping, empirical_fisher=True)
    settings = [Setting("exact", ProjectionSpec(0))]
    settings += [Setting(f"rank{r}", ProjectionSpec(0), r) for r in args.ranks]
    started = time.perf_counter()
    batches, q_batches, ids = inputs.batches, inputs.query_batches, inputs.query_ids
    scores, scorer = fidelity_scores(inputs.model, base, settings, batches, q_batches, ids, torch.device("cpu"))
    print(f"scored in {time.perf_counter() - started:.0f} s")
    out = {}
    for r in args.ranks:
        out[r] = agreement(scores[f"rank{r}"], scores["exact"], 10)
        print(f"rank {r}: top-10 overlap {out[r]['topk_overlap']:.3f}, Spearman {out[r]['spearman']:.3f} "
              f"(worst query {out[r]['spearman_min']:.3f})")
    if args.timed_queries > 0:
        time_ranks(inputs.model, base, scorer.full_factors, batches[: args.timed_batches], q_batches, ids, args, out)
    return out


def time_ranks(model, base: InfluenceConfig, factors, timed: list, q_batches: list, ids: list[str], args,
               out: dict) -> None:
    """Each rank's score pass over ``timed`` against ``args.timed_queries`` queries, and the ceiling, alternating."""
    d = AttributeConfig()
    engines, timed_q = {}, {}
    for r in args.ranks:
        engines[r] = InfluenceEngine(model, replace(base, query_rank=r, product_dtype=d.score.product_dtype))
        timed_q[r] = repeated_queries(engines[r].query_gradients(q_batches, factors, ids), args.timed_queries)
        engines[r].score_batch(timed[0], timed_q[r])  # warm-up
    tokens = int(sum(int(b.attention_mask.sum()) for b in timed))
    seconds: dict = {"ceiling": []} | {r: [] for r in args.ranks}
    plain = Ceiling(model, torch.device("cpu"))  # one warm copy, timed alternating with the score passes
    for _ in range(args.repeats):
        seconds["ceiling"].append(plain.seconds(timed))
        for r in args.ranks:
            t0 = time.perf_counter()
            for b in timed:
                engines[r].score_batch(b, timed_q[r])
            seconds[r].append(time.perf_counter() - t0)
    ceiling = statistics.median(seconds["ceiling"])
    print(f"timed: {len(timed)} batches, {tokens} tokens, {args.timed_queries} queries, products "
          f"{d.score.product_dtype}; ceiling {tokens / ceiling:.0f} tokens/s (median of {args.repeats})")
    for r in args.ranks:
        s = statistics.median(seconds[r])
        out[r].update(tokens_per_s=tokens / s, ceiling_ratio=ceiling / s)
        print(f"rank {r}: score {tokens / s:.0f} tokens/s, {ceiling / s:.2f}x the ceiling "
              f"(runs {', '.join(f'{x:.1f}' for x in seconds[r])} s)")
    out["ceiling_tokens_per_s"] = tokens / ceiling


if __name__ == "__main__":
    main()
