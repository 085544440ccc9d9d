"""The range finder's orthonormalisation on SmolLM2's real query matrices: float64 against float32, side by side.

``low_rank`` orthonormalises ``1 + 2 x RANGE_POWER_ITERS`` times per layer
and query batch (``pipeline.core.queries.orthonormal``). Until 2026-12-07
that was CholeskyQR2 in float64 whatever the input's dtype; now it is
CholeskyQR2 in float32 for float32 (and bfloat16) inputs. This check fits
exact EK-FAC factors on the first ``--windows`` windows of the speed
benchmark's SmolLM2 inputs (empirical Fisher, the job's default tracking),
then preconditions ``--queries`` queries at the job's default rank with each
orthonormalisation in turn, ``--repeats`` alternating rounds, and prints per
setting: seconds in ``query_gradients`` and in the orthonormalisations
alone (medians), how often float32 CholeskyQR2 fell back to Householder QR,
the condition numbers the Cholesky factors' diagonals estimate, and the
scores of the training windows against the float64 setting's (largest
difference relative to the largest score, top-10 overlap).

    python -m benchmarks.speed.orthonormal --windows 16 --queries 32 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.evaluate.check_inputs import add_input_arguments, load_inputs
from pipeline.config import AttributeConfig
from pipeline.core import queries as queries_module
from pipeline.core.influence import InfluenceConfig, InfluenceEngine


def float64_cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """``orthonormal`` as it was until 2026-12-07: CholeskyQR2 in float64 whatever ``y``'s dtype."""
    q = y.to(torch.float64)
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        diag = r.diagonal(dim1=-2, dim2=-1)
        if bool(info.any()) or bool((diag.amin(-1) <= 1e-6 * diag.amax(-1)).any()):
            return torch.linalg.qr(y if y.dtype in (torch.float32, torch.float64) else y.float()).Q.to(y.dtype)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q.to(y.dtype)


def float32_householder(y: torch.Tensor) -> torch.Tensor:
    """Householder QR in float32 (``torch.linalg.qr``), never CholeskyQR2."""
    return torch.linalg.qr(y.float()).Q.to(y.dtype)


SETTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "float64 CholeskyQR2 (until 2026-12-07)": float64_cholesky_qr2,
    "float32 CholeskyQR2 (orthonormal now)": queries_module.orthonormal,
    "float32 Householder": float32_householder,
}


class Timed:
    """Wraps an orthonormalisation, adding up its seconds and calls."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.fn(y)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def condition_estimates(y: torch.Tensor) -> list[float]:
    """``max(diag R) / min(diag R)`` of each matrix's Cholesky factor in float64: what the checks compare."""
    q = y.to(torch.float64)
    diag = torch.linalg.cholesky_ex(q.mT @ q, upper=True)[0].diagonal(dim1=-2, dim2=-1)
    return (diag.amax(-1) / diag.amin(-1)).tolist()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser, windows=16, queries=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = load_inputs(args)
    print(inputs.describe(), flush=True)
    d = AttributeConfig()
    config = InfluenceConfig(modules=d.model.modules, damping=d.factors.damping, empirical_fisher=True,
                             query_rank=d.score.query_rank, product_dtype=d.score.product_dtype)
    engine = InfluenceEngine(inputs.model, config)
    started = time.perf_counter()
    factors = engine.fit(inputs.batches)
    print(f"fitted in {time.perf_counter() - started:.0f} s; range finder products: "
          f"{engine.range_products or 'the matrices own dtype'}", flush=True)

    pipeline_orthonormal = queries_module.orthonormal
    conditions: list[float] = []
    fallbacks = [0]
    householder = torch.linalg.qr

    def counting_qr(*a, **kw):  # the pipeline's Householder fallback, counted
        fallbacks[0] += 1
        return householder(*a, **kw)

    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    inner: dict[str, list[float]] = {name: [] for name in SETTINGS}
    queries: dict = {}
    try:
        for round_ in range(args.repeats):
            for name, fn in SETTINGS.items():
                timed = Timed(fn)
                if fn is pipeline_orthonormal:
                    torch.linalg.qr = counting_qr

                    def observed(y, timed=timed):
                        if round_ == 0:
                            conditions.extend(condition_estimates(y))
                        return timed(y)

                    queries_module.orthonormal = observed
                else:
                    queries_module.orthonormal = timed
                start = time.perf_counter()
                queries[name] = engine.query_gradients(inputs.query_batches, factors, inputs.query_ids)
                seconds[name].append(time.perf_counter() - start)
                inner[name].append(timed.seconds)
                queries_module.orthonormal, torch.linalg.qr = pipeline_orthonormal, householder
                print(f"  round {round_ + 1} {name}: query_gradients {seconds[name][-1]:.1f} s, "
                      f"orthonormal {timed.seconds:.1f} s in {timed.calls} calls", flush=True)
    finally:
        queries_module.orthonormal, torch.linalg.qr = pipeline_orthonormal, householder

    names = list(SETTINGS)
    reference = torch.cat([engine.score_batch(b, queries[names[0]]) for b in inputs.batches])
    out: dict = {"windows": len(inputs.train), "queries": len(inputs.query_ids), "threads": args.threads}
    c = torch.tensor(conditions)
    out["condition"] = {"matrices": len(conditions), "median": float(c.median()), "max": float(c.max())}
    out["fallbacks"] = fallbacks[0]
    print(f"condition estimates ({len(conditions)} matrices): median {c.median():.3g}, "
          f"90th percentile {c.quantile(0.9):.3g}, largest {c.max():.3g}; float32 CholeskyQR2 fell back to "
          f"Householder {fallbacks[0]} times over {args.repeats} rounds")
    for name in names:
        scores = torch.cat([engine.score_batch(b, queries[name]) for b in inputs.batches])
        diff = float((scores - reference).abs().max() / reference.abs().max())
        k = min(10, scores.shape[0])
        overlap = statistics.mean(
            len(set(reference[:, q].topk(k).indices.tolist()) & set(scores[:, q].topk(k).indices.tolist())) / k
            for q in range(scores.shape[1])
        )
        row = {"query_gradients_s": statistics.median(seconds[name]), "orthonormal_s": statistics.median(inner[name]),
               "max_score_difference": diff, "top10_overlap": overlap}
        out[name] = row
        print(f"{name}: query_gradients {row['query_gradients_s']:.1f} s (median), orthonormal "
              f"{row['orthonormal_s']:.1f} s; scores vs float64: largest difference {diff:.1e} of the largest, "
              f"top-10 overlap {overlap:.3f}")
    return out


if __name__ == "__main__":
    main()
