"""What fitting on a sample costs in fidelity, on SmolLM2 (any --data).

The factors are fitted on every window (the reference), with the
eigenvalue correction on a share of the windows (``factors.lambda_sample``),
and with both passes on a share (``factors.sample_shards``, as a share of
windows here); each fit's scores with the attribution job's default setting
(projection off, rank-``score.query_rank`` queries) are compared with the
reference fit's and with exact EK-FAC (the full fit, dense queries): top-10
overlap and Spearman, mean over queries. Samples are
every n-th batch of 8 windows, as the pipeline spreads its shards. Same
inputs as ``benchmarks.evaluate.rank_check`` (pretrained SmolLM2-135M, the
planted-facts recipe's documents, empirical Fisher, in process). A fit's cost
in capture passes over the windows is ``cov + lambda`` shares (plus the
eigendecompositions, the same for every fit).

``--data`` takes other inputs (``check_inputs``): ``facts``, the inputs of
tests/eval/test_smollm2_default_fidelity.py (recipe seed ``--seed``);
``pydoc``, distinct text at any size instead of the benchmark corpus, which
repeats its documents beyond the recipe's (and so would flatter a sample);
``finetuned``, the fine-tuned facts model. ``--lambda-only`` skips the
"both passes on a share" fits, ``--both-only`` the "Lambda on a share" ones.

Every low-rank fit's queries are scored in one pass over the windows (their
queries side by side), and exact EK-FAC's dense ones in a second.

    python -m benchmarks.evaluate.fit_sample_check --windows 96 --queries 16 --shares 0.5 0.25
    python -m benchmarks.evaluate.fit_sample_check --data facts --seed 13 --queries 8 --shares 0.5 0.25 --lambda-only
    python -m benchmarks.evaluate.fit_sample_check --data pydoc --windows 512 --queries 16 \
        --shares 0.25 0.125 0.0625 --lambda-only
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from benchmarks.evaluate.check_inputs import add_input_arguments, load_inputs, scores_of
from benchmarks.evaluate.scoring import agreement
from pipeline.config import AttributeConfig
from pipeline.core.ekfac import EKFACFactors, eigendecompose
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.queries import QueryGradients


def every(batches: list, share: float) -> list:
    """``share`` of ``batches``, evenly spread (at least one)."""
    step = max(1, round(1 / share))
    return batches[::step]


def scores_with(engine: InfluenceEngine, fits: dict[str, EKFACFactors], train: list, queries: list,
                ids: list[str]) -> dict[str, np.ndarray]:
    """Each fit's ``(windows, queries)`` scores of ``train`` batches, in one pass over them.

    Every fit's preconditioned queries are put side by side and scored
    together, then split again, so a fit costs its queries' preconditioning
    and products, not another backward pass over the windows.
    """
    parts = [engine.query_gradients(queries, factors, [f"{name}/{q}" for q in ids]) for name, factors in fits.items()]
    scores = scores_of(engine, train, QueryGradients.concat(parts))
    return {name: scores[:, i * len(ids):(i + 1) * len(ids)] for i, name in enumerate(fits)}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_arguments(parser, windows=96)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--lambda-only", action="store_true", help='skip the "both passes on a share" fits')
    only.add_argument("--both-only", action="store_true", help='skip the "Lambda on a share" fits')
    args = parser.parse_args(argv)
    d = AttributeConfig()
    inputs = load_inputs(args)
    model, batches, q_batches, ids = inputs.model, inputs.batches, inputs.query_batches, inputs.query_ids
    print(f"{inputs.describe()}, query rank {d.score.query_rank}")
    engine = InfluenceEngine(model, InfluenceConfig(modules=d.model.modules, damping=d.factors.damping,
                                                    empirical_fisher=True, query_rank=d.score.query_rank))
    started = time.perf_counter()
    full_cov = engine.covariance_sums(batches)
    full_bases = eigendecompose(full_cov)
    fits = {"full": EKFACFactors.from_parts(engine.factors_meta(), full_bases,
                                            engine.lambda_sums(batches, full_bases))}
    cost = {"full": (1.0, 1.0)}
    for share in args.shares:
        part = every(batches, share)
        if not args.both_only:
            fits[f"lambda {share}"] = EKFACFactors.from_parts(engine.factors_meta(), full_bases,
                                                              engine.lambda_sums(part, full_bases))
            cost[f"lambda {share}"] = (1.0, len(part) / len(batches))
        if args.lambda_only:
            continue
        bases = eigendecompose(engine.covariance_sums(part))
        fits[f"both {share}"] = EKFACFactors.from_parts(engine.factors_meta(), bases,
                                                        engine.lambda_sums(part, bases))
        cost[f"both {share}"] = (len(part) / len(batches), len(part) / len(batches))
    print(f"fitted in {time.perf_counter() - started:.0f} s")
    scores = scores_with(engine, fits, batches, q_batches, ids)
    print(f"scored in {time.perf_counter() - started:.0f} s")
    # Exact EK-FAC: the full fit with dense preconditioned queries (what the default is held to).
    engine.config = replace(engine.config, query_rank=0)
    exact = scores_with(engine, {"exact": fits["full"]}, batches, q_batches, ids)["exact"]
    out = {}
    for name in fits:
        cov, lam = cost[name]
        out[name] = {"capture_passes": round(cov + lam, 3),
                     "vs_full_fit": agreement(scores[name], scores["full"], 10),
                     "vs_exact": agreement(scores[name], exact, 10)}
        print(f"{name}: capture passes {cov:.2f} + {lam:.2f}; top-10 overlap with the full fit (same rank) "
              f"{out[name]['vs_full_fit']['topk_overlap']:.3f} (Spearman {out[name]['vs_full_fit']['spearman']:.3f}),"
              f" with exact EK-FAC {out[name]['vs_exact']['topk_overlap']:.3f} "
              f"(Spearman {out[name]['vs_exact']['spearman']:.3f})")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return out


if __name__ == "__main__":
    main()
