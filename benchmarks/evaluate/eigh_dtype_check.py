"""What float32 eigendecompositions cost in fidelity and gain in time, on SmolLM2 (any --data).

The fit's driver eigendecomposes every tracked layer's ``A`` and ``S``
(``factors.eigh_dtype``). This fits the covariances once on the first
``--windows`` windows with the attribution job's defaults (empirical Fisher,
bfloat16 fit products), eigendecomposes them in float64 and in float32 (each
timed over all layers, medians of ``--repeats`` alternating repeats), fits
the eigenvalue correction in each basis, and scores ``--queries`` queries with
the job's default setting (rank-``score.query_rank`` queries, bfloat16
scoring products) against exact EK-FAC (float64 bases, float32 products,
dense queries): top-10 overlap and Spearman of each, and of float32 against
float64 bases.

    python -m benchmarks.evaluate.eigh_dtype_check --windows 64 --queries 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.evaluate.scoring import agreement
from benchmarks.evaluate.check_inputs import add_input_arguments, load_inputs, scores_of
from pipeline.config import AttributeConfig
from pipeline.core.ekfac import EIGH_DTYPES, EKFACFactors, eigendecompose
from pipeline.core.influence import InfluenceEngine


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    inputs = load_inputs(args)
    batches, q_batches, ids = inputs.batches, inputs.query_batches, inputs.query_ids
    default = replace(AttributeConfig().influence(), empirical_fisher=True)
    print(f"{inputs.describe()}, query rank {default.query_rank}, products {default.product_dtype} / fit "
          f"{default.fit_product_dtype}, threads {torch.get_num_threads()}")
    engine = InfluenceEngine(inputs.model, default)
    cov = engine.covariance_sums(batches)
    seconds: dict[str, list[float]] = {dt: [] for dt in EIGH_DTYPES}
    bases = {}
    for _ in range(args.repeats):
        for dt in EIGH_DTYPES:
            started = time.perf_counter()
            bases[dt] = eigendecompose(cov, getattr(torch, dt))
            seconds[dt].append(time.perf_counter() - started)
    out: dict = {"layers": len(cov.a_sum)}
    scores = {}
    for dt in EIGH_DTYPES:
        factors = EKFACFactors.from_parts(engine.factors_meta(), bases[dt], engine.lambda_sums(batches, bases[dt]))
        scores[dt] = scores_of(engine, batches, engine.query_gradients(q_batches, factors, ids))
    exact_engine = InfluenceEngine(inputs.model, replace(default, query_rank=0, product_dtype="float32",
                                                         fit_product_dtype="float32", eigh_dtype="float64"))
    exact_factors = exact_engine.fit(batches)
    exact = scores_of(exact_engine, batches, exact_engine.query_gradients(q_batches, exact_factors, ids))
    for dt in EIGH_DTYPES:
        s = statistics.median(seconds[dt])
        out[dt] = {"eigh_s": s, "vs_exact": agreement(scores[dt], exact, 10)}
        a = out[dt]["vs_exact"]
        print(f"eigh {dt}: {2 * len(cov.a_sum)} eigendecompositions in {s:.1f} s (runs "
              f"{', '.join(f'{x:.1f}' for x in seconds[dt])}); default setting's top-10 overlap with exact "
              f"EK-FAC {a['topk_overlap']:.3f} (Spearman {a['spearman']:.4f}, worst query {a['spearman_min']:.4f})")
    out["float32_vs_float64"] = agreement(scores["float32"], scores["float64"], 10)
    rel = float(np.abs(scores["float32"] - scores["float64"]).max() / np.abs(scores["float64"]).max())
    out["largest_difference"] = rel
    print(f"float32 vs float64 bases, same setting: top-10 overlap "
          f"{out['float32_vs_float64']['topk_overlap']:.3f} (Spearman {out['float32_vs_float64']['spearman']:.6f}), "
          f"largest difference {rel:.2e} of the largest score")
    return out


if __name__ == "__main__":
    main()
