"""What bfloat16 and int8 scoring products cost in fidelity and gain in speed, on SmolLM2 (any --data).

With low-rank queries scored per token, the score pass's extra work is two
products per layer, ``g_t . L`` and ``a_t . R`` (``QueryGradients.token_scores``).
``score.product_dtype=bfloat16`` rounds their inputs to bfloat16 (matrix
units: AMX on recent Xeons, tensor cores on GPUs); ``int8`` quantises them
(a scale per token and per query column, int32 sums: VNNI on x86 CPUs; a
device without fast int8 or bfloat16 multiplies in float32, so that row then
repeats float32's). This fits exact EK-FAC on
the first ``--windows`` windows (empirical Fisher, the attribution job's
tracked layers and damping), preconditions ``--queries`` queries at the
default rank and dense (exact EK-FAC), and reports, for float32, bfloat16 and
int8 products: top-10 overlap and Spearman against exact EK-FAC (mean over
queries), and the score pass's time over ``--timed-batches`` batches of 8
windows against ``--timed-queries`` queries (the queries repeated to that
count), side by side with the ceiling (plain forward + backward with every
weight's gradient), medians of ``--repeats`` alternating repeats.
``--fidelity-only`` stops after the overlaps of the scoring products.

The fit's products (``factors.product_dtype``: the covariances and Lambda's
rotation) are checked the same way: a second fit with bfloat16 products,
scored with the default setting against the same exact EK-FAC, and both
fits' two capture passes timed over the timed batches.

    python -m benchmarks.evaluate.product_dtype_check --windows 64 --queries 16 --timed-queries 100
    python -m benchmarks.evaluate.product_dtype_check --data finetuned --windows 128 --queries 8 --fidelity-only
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.evaluate.scoring import agreement, repeated_queries
from benchmarks.evaluate.check_inputs import add_input_arguments, load_inputs, scores_of
from benchmarks.speed.inputs import Ceiling
from pipeline.config import AttributeConfig
from pipeline.core.ekfac import eigendecompose
from pipeline.core.influence import InfluenceConfig, InfluenceEngine

DTYPES = ("float32", "bfloat16")  # the fit's
SCORE_DTYPES = (*DTYPES, "int8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--timed-queries", type=int, default=100)
    parser.add_argument("--timed-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fidelity-only", action="store_true",
                        help="the scoring products' overlap only: no fit with bfloat16 products, no timing")
    args = parser.parse_args(argv)
    d = AttributeConfig()
    inputs = load_inputs(args)
    batches, q_batches, ids = inputs.batches, inputs.query_batches, inputs.query_ids
    print(f"{inputs.describe()}, query rank {d.score.query_rank}, threads {torch.get_num_threads()}")
    base = InfluenceConfig(modules=d.model.modules, damping=d.factors.damping, empirical_fisher=True,
                           query_rank=d.score.query_rank)
    engines = {dt: InfluenceEngine(inputs.model, replace(base, product_dtype=dt)) for dt in SCORE_DTYPES}
    print("products in use: " + ", ".join(f"{dt} -> {engines[dt].products or 'float32'}" for dt in SCORE_DTYPES))
    fitters = {dt: InfluenceEngine(inputs.model, replace(base, fit_product_dtype=dt)) for dt in DTYPES}
    started = time.perf_counter()
    factors = fitters["float32"].fit(batches)
    print(f"fitted in {time.perf_counter() - started:.0f} s")
    low = engines["float32"].query_gradients(q_batches, factors, ids)
    scores = {dt: scores_of(engines[dt], batches, low) for dt in SCORE_DTYPES}
    exact_engine = InfluenceEngine(inputs.model, replace(base, query_rank=0))
    exact = scores_of(exact_engine, batches, exact_engine.query_gradients(q_batches, factors, ids))
    out: dict = {}
    for dt in SCORE_DTYPES:
        out[dt] = {"vs_exact": agreement(scores[dt], exact, 10)}
        a = out[dt]["vs_exact"]
        print(f"products {dt}: top-10 overlap with exact EK-FAC {a['topk_overlap']:.3f} "
              f"(Spearman {a['spearman']:.4f}, worst query {a['spearman_min']:.4f})")
    for dt in SCORE_DTYPES[1:]:
        out[dt]["vs_float32"] = agreement(scores[dt], scores["float32"], 10)
        rel = np.abs(scores[dt] - scores["float32"]).max() / np.abs(scores["float32"]).max()
        out[dt]["largest_difference"] = float(rel)
        print(f"{dt} vs float32 products: top-10 overlap {out[dt]['vs_float32']['topk_overlap']:.3f}, "
              f"largest difference {rel:.2e} of the largest score")
    if args.fidelity_only:
        return out
    # The default setting (bfloat16 scoring products) on the factors fitted with bfloat16 products.
    started = time.perf_counter()
    factors16 = fitters["bfloat16"].fit(batches)
    print(f"fitted with bfloat16 products in {time.perf_counter() - started:.0f} s")
    fit16 = scores_of(engines["bfloat16"], batches, engines["float32"].query_gradients(q_batches, factors16, ids))
    out["fit_bfloat16"] = {"vs_exact": agreement(fit16, exact, 10),
                           "vs_fit_float32": agreement(fit16, scores["bfloat16"], 10)}
    a = out["fit_bfloat16"]
    print(f"fit with bfloat16 products, scored with bfloat16 products: top-10 overlap with exact EK-FAC "
          f"{a['vs_exact']['topk_overlap']:.3f} (Spearman {a['vs_exact']['spearman']:.4f}, worst query "
          f"{a['vs_exact']['spearman_min']:.4f}); with the float32 fit's {a['vs_fit_float32']['topk_overlap']:.3f}")

    # Speed: the same batches and the queries repeated to --timed-queries, each dtype and the ceiling in turn.
    timed_q = repeated_queries(low, args.timed_queries)
    timed = batches[: args.timed_batches]
    timed_tokens = int(sum(int(b.attention_mask.sum()) for b in timed))
    seconds: dict[str, list[float]] = {"ceiling": []}
    seconds.update({dt: [] for dt in SCORE_DTYPES} | {f"fit {dt}": [] for dt in DTYPES})
    bases = eigendecompose(fitters["float32"].covariance_sums(timed))  # the basis the timed Lambda pass uses
    for dt in SCORE_DTYPES:
        engines[dt].score_batch(timed[0], timed_q)  # warm-up
    plain = Ceiling(inputs.model, torch.device("cpu"))  # one warm copy, timed alternating with the score passes
    for _ in range(args.repeats):
        seconds["ceiling"].append(plain.seconds(timed))
        for dt in SCORE_DTYPES:
            t0 = time.perf_counter()
            for b in timed:
                engines[dt].score_batch(b, timed_q)
            seconds[dt].append(time.perf_counter() - t0)
        for dt in DTYPES:  # the fit's two capture passes (covariances, then Lambda in the fitted basis)
            t0 = time.perf_counter()
            fitters[dt].covariance_sums(timed)
            fitters[dt].lambda_sums(timed, bases)
            seconds[f"fit {dt}"].append(time.perf_counter() - t0)
    ceiling = statistics.median(seconds["ceiling"])
    print(f"timed: {len(timed)} batches, {timed_tokens} tokens, {args.timed_queries} queries; ceiling "
          f"{timed_tokens / ceiling:.0f} tokens/s (median of {args.repeats})")
    for dt in SCORE_DTYPES:
        s = statistics.median(seconds[dt])
        out[dt]["tokens_per_s"] = timed_tokens / s
        out[dt]["ceiling_ratio"] = ceiling / s
        print(f"products {dt}: score {timed_tokens / s:.0f} tokens/s, {ceiling / s:.2f}x the ceiling "
              f"(runs {', '.join(f'{x:.1f}' for x in seconds[dt])} s)")
    for dt in DTYPES:
        s = statistics.median(seconds[f"fit {dt}"])
        out[f"fit_{dt}_ceiling_passes"] = s / ceiling
        print(f"fit products {dt}: the two capture passes take {s / ceiling:.2f} ceiling passes "
              f"(runs {', '.join(f'{x:.1f}' for x in seconds[f'fit {dt}'])} s)")
    out["ceiling_tokens_per_s"] = timed_tokens / ceiling
    return out


if __name__ == "__main__":
    main()
