"""Fidelity and cost of every EK-FAC setting on one model, and the default chosen by the rule.

Settings (``sweep_settings``): ``exact`` (projection off, dense preconditioned
queries: the reference), ``rank-r`` (projection off, queries compressed to
rank ``r`` per layer), ``sketch-d`` (full-size factors, queries projected
after preconditioning) and ``curvature-d`` (EK-FAC fitted on projected
vectors, LoGra).

- **Agreement** (``fidelity_scores``): every setting's window scores over all
  training windows from shared captures (``SharedCaptureScorer``: one fit,
  same sampled labels, one scoring pass), then per query Spearman and top-k
  overlap of the proponents against ``exact``, averaged over queries.
- **Cost** (``cost_rows``), on the first batches: the ceiling (a plain
  forward + backward of the summed loss with every weight's gradient) and
  each setting run on its own ``InfluenceEngine`` as a shard worker runs it:
  its fit's capture passes (curvature settings fit their own; the others
  use the exact factors, whose float64 eigendecomposition is timed once, in
  the shared fit), query preconditioning and scoring, timed; and the
  process's peak RSS while the setting ran (``RssSampler``: freed heap
  memory is returned to the OS before each setting, so the peak above the
  setting's start is its own).

``choose_default`` applies the rule of docs/design.md#maths ("Choosing the
default"). Gradient dot product and cosine come out of the shared scoring
pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from benchmarks.evaluate.scoring import SharedCaptureScorer, agreement, projected_size
from benchmarks.speed.inputs import Ceiling
from pipeline import heap
from pipeline.core.ekfac import EKFACFactors, eigendecompose
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import Batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One EK-FAC setting of the sweep: a projection and a query rank (0: dense queries)."""

    name: str
    projection: ProjectionSpec
    query_rank: int = 0

    @property
    def kind(self) -> str:
        """``exact``, ``rank`` (projection off, low-rank queries), ``sketch`` or ``curvature``."""
        if not self.projection.enabled:
            return "rank" if self.query_rank else "exact"
        return self.projection.mode

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "mode": self.projection.mode if self.projection.enabled else None,
                "dim": self.projection.dim, "query_rank": self.query_rank}


def sweep_settings(modes: list[str], dims: list[int], ranks: list[int], seed: int) -> list[Setting]:
    """``exact`` first (the reference), then the query ranks, then every mode x dim."""
    out = [Setting("exact", ProjectionSpec(0, seed))]
    out += [Setting(f"rank-{int(r)}", ProjectionSpec(0, seed), int(r)) for r in ranks]
    out += [Setting(f"{m}-{int(d)}", ProjectionSpec(int(d), seed, m)) for m in modes for d in dims]
    return out


class RssSampler:
    """Peak resident set size of this process while in the ``with`` block, sampled every ``interval`` s.

    Before starting, freed heap memory is handed back to the OS
    (``pipeline.heap.release``: glibc ``malloc_trim``) so an earlier setting's freed buffers do not count.
    """

    def __init__(self, interval: float = 0.02):
        import psutil

        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_mib = self.peak_mib = 0.0

    def _rss(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self._rss())

    def __enter__(self) -> "RssSampler":
        heap.release()
        self.start_mib = self.peak_mib = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._rss())


def _fit(engine: InfluenceEngine, batches: list[Batch]) -> tuple[EKFACFactors, dict]:
    """``engine.fit`` with each stage timed: covariance pass, eigendecomposition, Lambda pass."""
    t0 = time.perf_counter()
    cov = engine.covariance_sums(batches)
    t1 = time.perf_counter()
    bases = eigendecompose(cov)
    del cov
    t2 = time.perf_counter()
    lam = engine.lambda_sums(batches, bases)
    t3 = time.perf_counter()
    factors = EKFACFactors.from_parts(engine.factors_meta(), bases, lam)
    return factors, {"covariance_s": t1 - t0, "eigendecompose_s": t2 - t1, "lambda_s": t3 - t2, "fit_s": t3 - t0}


def _score_pass(engine: InfluenceEngine, batches: list[Batch], queries: QueryGradients) -> float:
    """Seconds of scoring ``batches`` against ``queries`` as a shard worker does (capture, then one product)."""
    started = time.perf_counter()
    for batch in batches:
        engine.score_batch(batch, queries)
    return time.perf_counter() - started


def fidelity_scores(model: torch.nn.Module, base: InfluenceConfig, settings: list[Setting], train: list[Batch],
                    queries: list[Batch], query_ids: list[str], device: torch.device
                    ) -> tuple[dict[str, np.ndarray], SharedCaptureScorer]:
    """``(N, Q)`` window scores of every setting over all of ``train``, from shared captures, and the scorer.

    Same factors data, same sampled labels for every setting
    (``SharedCaptureScorer``); ``exact`` is projection off with dense queries.
    Also ``grad_dot`` and ``grad_cos`` (identity curvature).
    """
    others = [s for s in settings if s.kind != "exact"]
    scorer = SharedCaptureScorer(model, base, {s.name: s.projection for s in others}, device,
                                 {s.name: s.query_rank for s in others})
    scorer.fit(train)
    scores = scorer.score(train, scorer.query_gradients(queries, query_ids))
    scores["exact"] = scores.pop("ekfac")
    return scores, scorer


def _exact_fit(engine: InfluenceEngine, batches: list[Batch], scorer: SharedCaptureScorer) -> dict:
    """The exact fit's two capture passes over ``batches``, timed; its eigendecomposition is the scorer's.

    The full-size eigendecomposition (the fit's fixed cost, independent of
    the corpus) is timed once, in the fidelity fit, and not repeated.
    """
    t0 = time.perf_counter()
    engine.covariance_sums(batches)
    t1 = time.perf_counter()
    engine.lambda_sums(batches, scorer.full_bases)
    t2 = time.perf_counter()
    return {"covariance_s": t1 - t0, "eigendecompose_s": scorer.eigendecompose_s, "lambda_s": t2 - t1,
            "fit_s": t2 - t0 + scorer.eigendecompose_s}


def cost_rows(model: torch.nn.Module, base: InfluenceConfig, settings: list[Setting], batches: list[Batch],
              queries: list[Batch], query_ids: list[str], device: torch.device, scorer: SharedCaptureScorer,
              on_setting: Callable[[dict], None] | None = None) -> tuple[dict, list[dict]]:
    """The ceiling and each setting's own fit, preconditioning and scoring on ``batches``, timed.

    Settings on full-size factors (exact, query ranks, sketch) precondition
    with the fidelity fit's exact factors (``scorer``); the exact fit's two
    passes are timed on ``batches`` and its eigendecomposition taken from the
    fidelity fit. Curvature settings are fitted on ``batches``, each on its
    own. Returns ``(ceiling, rows)``.
    """
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    with RssSampler() as rss:
        ceiling_s = Ceiling(model, device).seconds(batches)
    ceiling = {"seconds": ceiling_s, "tokens": tokens, "windows": sum(b.input_ids.shape[0] for b in batches),
               "tokens_per_s": tokens / ceiling_s, "peak_rss_mib": rss.peak_mib}
    log.info("ceiling: %.1f s for %d tokens (%.0f tokens/s)", ceiling_s, tokens, tokens / ceiling_s)
    exact_fit: dict = {}
    rows = []
    for setting in sorted(settings, key=lambda s: s.kind != "exact"):
        config = replace(base, projection=setting.projection, query_rank=setting.query_rank)
        with RssSampler() as rss:
            engine = InfluenceEngine(model, config, device)
            shared = config.factor_space == "full" and setting.kind != "exact"
            if config.factor_space == "projected":
                factors, fit = _fit(engine, batches)
            else:
                factors = scorer.full_factors
                if setting.kind == "exact":
                    exact_fit = _exact_fit(engine, batches, scorer)
                fit = exact_fit
            started = time.perf_counter()
            q = engine.query_gradients(queries, factors, query_ids)
            precondition_s = time.perf_counter() - started
            score_s = _score_pass(engine, batches, q)
        row = {**setting.to_json(), "projected_size": projected_size(engine),
               "query_bytes": engine.query_bytes(len(query_ids)),
               "score_s": score_s, "score_tokens_per_s": tokens / score_s,
               "score_to_ceiling": ceiling_s / score_s, "precondition_s": precondition_s, **fit,
               "fit_shared_with_exact": shared,
               "fit_ceiling_passes": fit["fit_s"] / ceiling_s,
               "fit_passes_without_eigh": (fit["covariance_s"] + fit["lambda_s"]) / ceiling_s,
               "peak_rss_mib": rss.peak_mib, "start_rss_mib": rss.start_mib}
        rows.append(row)
        log.info("%s: score %.1f s (%.2fx ceiling), precondition %.1f s, fit %.1f s (%.2f passes without eigh, "
                 "eigh %.1f s), peak RSS %.0f MiB", setting.name, score_s, row["score_to_ceiling"], precondition_s,
                 fit["fit_s"], row["fit_passes_without_eigh"], fit["eigendecompose_s"], rss.peak_mib)
        if on_setting is not None:
            on_setting(row)
        del q, engine, factors
    return ceiling, rows


def run_sweep(model: torch.nn.Module, base: InfluenceConfig, settings: list[Setting], train: list[Batch],
              queries: list[Batch], query_ids: list[str], device: torch.device, top_k: int = 10,
              cost_batches: int = 0, on_setting: Callable[[dict], None] | None = None,
              on_fidelity: Callable[[dict, dict], None] | None = None) -> dict:
    """Agreement with ``exact`` over all of ``train`` and cost on its first ``cost_batches`` batches (0: all).

    Returns ``{"ceiling", "rows", "scores": {name: (N, Q)}, "top_k", "cost_windows"}``
    (``grad_dot`` and ``grad_cos`` among the scores). ``on_setting(row)``
    is called after each setting's cost row and ``on_fidelity(agreements,
    scores)`` once the agreement is known (progress, partial results).
    """
    if not any(s.kind == "exact" for s in settings):
        raise ValueError("the sweep needs the exact setting (projection off, dense queries): it is the reference")
    started = time.perf_counter()
    scores, scorer = fidelity_scores(model, base, settings, train, queries, query_ids, device)
    log.info("fidelity scores of %d settings over %d windows: %.1f s", len(settings),
             scores["exact"].shape[0], time.perf_counter() - started)
    agreements = {s.name: agreement(scores[s.name], scores["exact"], top_k) for s in settings}
    if on_fidelity is not None:
        on_fidelity(agreements, scores)
    cost_train = train[:cost_batches] if cost_batches else train
    ceiling, rows = cost_rows(model, base, settings, cost_train, queries, query_ids, device, scorer, on_setting)
    for row in rows:
        row.update(agreements[row["name"]])
    return {"ceiling": ceiling, "rows": rows, "scores": scores, "top_k": top_k,
            "cost_windows": ceiling["windows"], "fidelity_windows": int(scores["exact"].shape[0])}


def choose_default(rows: list[dict], min_overlap: float) -> dict:
    """The rule: among projected settings with mean top-k overlap >= ``min_overlap``, the fastest scorer.

    When none qualifies: projection off with the lowest query rank that
    qualifies, else projection off with dense queries (``exact``). "Fastest"
    is the highest score-stage tokens/s (the fit runs once, on a sample, and
    is reported beside it).
    """
    projected = [r for r in rows if r["kind"] in ("sketch", "curvature") and r["topk_overlap"] >= min_overlap]
    if projected:
        best, why = max(projected, key=lambda r: r["score_tokens_per_s"]), "fastest qualifying projected setting"
    else:
        ranks = sorted((r for r in rows if r["kind"] == "rank" and r["topk_overlap"] >= min_overlap),
                       key=lambda r: r["query_rank"])
        if ranks:
            best, why = ranks[0], "no projected setting qualifies; lowest qualifying query rank"
        else:
            best, why = next(r for r in rows if r["kind"] == "exact"), "nothing qualifies; projection off, dense"
    return {"name": best["name"], "mode": best["mode"], "dim": best["dim"], "query_rank": best["query_rank"],
            "reason": why, "min_topk_overlap": min_overlap, "topk_overlap": best["topk_overlap"],
            "spearman": best["spearman"], "score_to_ceiling": best["score_to_ceiling"],
            "qualifying": [r["name"] for r in rows if r["topk_overlap"] >= min_overlap]}
