"""Every method's scores on one model, and the tables that compare them.

All EK-FAC settings of one model are scored from shared full-size captures
(``SharedCaptureScorer``): one forward/backward per batch and pass feeds
every projection setting, exactly as separate engines would (projection is
linear and applied to the same captured vectors; ``tests/eval/test_eval_jobs.py``
checks the equality against ``InfluenceEngine.score_batch``). The helpers
below turn window scores into document scores and scores into metric tables
with a chance row.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks import metrics
from benchmarks.baselines import (
    cosine_matrix,
    query_gradient_norms,
    raw_query_gradients,
    representations,
    sequence_gradient_norms,
)
from pipeline.core.text import batches_of
from pipeline.core.ekfac import CovarianceSums, EKFACFactors, LambdaSums, eigendecompose
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import Batch, TokenWindow
from pipeline.core.tracking import Captured


def _project(captured: dict[str, Captured], engine: InfluenceEngine) -> dict[str, Captured]:
    """Full-size captured vectors mapped into ``engine``'s projected space (``P_in a``, ``P_out g``)."""
    if engine.projector is None:
        return captured
    t_in, t_out = engine.projector.transforms()
    out = {}
    for name, c in captured.items():
        a = t_in[name](c.a) if t_in.get(name) is not None else c.a
        g = t_out[name](c.g) if t_out.get(name) is not None else c.g
        out[name] = Captured(a, g)
    return out


class SharedCaptureScorer:
    """Several EK-FAC settings of one model, scored from one forward/backward per batch and pass.

    ``settings`` maps a name to a ``ProjectionSpec`` (dim 0 = plain EK-FAC).
    Full-size vectors are captured once (sampled labels for the two fitting
    passes, data labels for scoring) and projected per setting, which is
    exactly what an engine with that projection would capture. Sketch-mode
    settings use the full-size factors; curvature-mode settings get factors
    fitted on their projected vectors; ``query_ranks`` gives a setting's
    ``score.query_rank`` (default 0: dense). ``score`` also returns the identity-
    curvature baselines ``grad_dot`` and ``grad_cos`` from the same captures.
    """

    def __init__(self, model, base: InfluenceConfig, settings: dict[str, ProjectionSpec], device,
                 query_ranks: dict[str, int] | None = None):
        self.base = base
        self.full = InfluenceEngine(model, replace(base, projection=ProjectionSpec(0)), device)
        ranks = query_ranks or {}
        self.engines = {name: InfluenceEngine(self.full.model,
                                              replace(base, projection=spec, query_rank=ranks.get(name, 0)), device)
                        for name, spec in settings.items()}
        self.device = self.full.device
        self.factors: dict[str, EKFACFactors] = {}
        self.full_factors: EKFACFactors | None = None
        # Set by fit: the full-size eigenbases and the seconds their eigendecomposition took.
        self.full_bases = None
        self.eigendecompose_s: float | None = None

    def _curvature(self) -> dict[str, InfluenceEngine]:
        return {n: e for n, e in self.engines.items() if e.config.factor_space == "projected"}

    def fit(self, batches: list[Batch]) -> None:
        """Both EK-FAC passes for the full space and every curvature-mode space."""
        label_mode = "data" if self.base.empirical_fisher else "sampled"
        curvature = self._curvature()
        cov = CovarianceSums.zeros(self.full.space_dims(False), self.device)
        cov_p = {n: CovarianceSums.zeros(e.space_dims(True), self.device) for n, e in curvature.items()}
        for batch in batches:
            captured, _ = self.full.capture_batch(batch, False, label_mode, self.base.seed)
            mask = batch.attention_mask.to(self.device)
            cov.update(captured, mask)
            for n, e in curvature.items():
                cov_p[n].update(_project(captured, e), mask)
        started = time.perf_counter()
        bases = eigendecompose(cov)
        self.eigendecompose_s = time.perf_counter() - started
        bases_p = {n: eigendecompose(c) for n, c in cov_p.items()}
        self.full_bases = bases
        lam = LambdaSums.zeros(self.full.space_dims(False), self.device)
        lam_p = {n: LambdaSums.zeros(e.space_dims(True), self.device) for n, e in curvature.items()}
        for batch in batches:  # the engines' second-pass labels (`InfluenceEngine.lambda_sums`)
            captured, _ = self.full.capture_batch(batch, False, label_mode, self.base.seed + 1)
            count = batch.input_ids.shape[0]
            lam.update(captured, bases, count)
            for n, e in curvature.items():
                lam_p[n].update(_project(captured, e), bases_p[n], count)
        self.full_factors = EKFACFactors.from_parts(self.full.factors_meta(), bases, lam)
        for name, engine in self.engines.items():
            if name in curvature:
                self.factors[name] = EKFACFactors.from_parts(engine.factors_meta(), bases_p[name], lam_p[name])
            else:
                self.factors[name] = self.full_factors

    def query_gradients(self, batches: list[Batch], query_ids: list[str]) -> dict[str, QueryGradients]:
        """Preconditioned query gradients of every setting, plus ``ekfac`` (dim 0) and ``raw`` (identity)."""
        out = {"ekfac": self.full.query_gradients(batches, self.full_factors, query_ids)}
        for name, engine in self.engines.items():
            out[name] = engine.query_gradients(batches, self.factors[name], query_ids)
        out["raw"] = raw_query_gradients(self.full, batches, query_ids)
        return out

    def score(self, batches: list[Batch], queries: dict[str, QueryGradients]) -> dict[str, np.ndarray]:
        """``(N, Q)`` float64 scores per setting name, plus ``ekfac``, ``grad_dot`` and ``grad_cos``."""
        names = ["ekfac", *self.engines]
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in [*names, "grad_dot", "grad_cos"]}
        q_norm = query_gradient_norms(queries["raw"]).to(torch.float64).cpu()
        for batch in batches:
            captured, _ = self.full.capture_batch(batch, projected=False, label_mode="data")
            for name in names:
                cap = captured if name == "ekfac" else _project(captured, self.engines[name])
                q = queries[name]
                parts[name].append(sum(q.layer_scores(n, cap[n]) for n in self.full.layers).double().cpu())
            dot = sum(queries["raw"].layer_scores(n, captured[n]) for n in self.full.layers).double().cpu()
            norms = sequence_gradient_norms(captured).double().cpu()
            parts["grad_dot"].append(dot)
            parts["grad_cos"].append(dot / (norms[:, None] * q_norm[None, :]).clamp(min=1e-300))
        return {n: torch.cat(p).numpy() for n, p in parts.items()}


def score_settings(model, base: InfluenceConfig, settings: dict[str, ProjectionSpec], train: list[TokenWindow],
                   queries: list[TokenWindow], pad_id: int, batch_size: int, device):
    """Fit and score every setting on ``train`` for ``queries``: ``(scorer, {name: (N, Q) scores})``.

    ``ekfac_projected`` is always present: the default projection's scores,
    or ``ekfac``'s when the default projection is off.
    """
    scorer = SharedCaptureScorer(model, base, settings, device)
    train_batches = batches_of(train, batch_size, pad_id)
    scorer.fit(train_batches)
    query_grads = scorer.query_gradients(batches_of(queries, batch_size, pad_id), [q.doc_id for q in queries])
    scores = scorer.score(train_batches, query_grads)
    if "ekfac_projected" not in scores:
        scores["ekfac_projected"] = scores["ekfac"]
    return scorer, scores


def default_settings(base: InfluenceConfig) -> dict[str, ProjectionSpec]:
    """``ekfac_projected``: the attribution job's default projection, when it is on."""
    return {"ekfac_projected": base.projection} if base.projection.enabled else {}


def projected_size(engine: InfluenceEngine) -> int:
    """Numbers per training gradient the setting stores and multiplies: ``sum over layers k_out * k_in``."""
    return int(sum(a * b for a, b in engine.space_dims(True).values()))


def repsim(model, tokenizer, train: list[TokenWindow], queries: list[TokenWindow], device,
           batch_size: int) -> np.ndarray:
    """RepSim ``(N, Q)``: cosine of mean-pooled last hidden states."""
    pad = tokenizer.pad_token_id
    model = model.to(device)
    train_rep = representations(model, batches_of(train, batch_size, pad), device)
    query_rep = representations(model, batches_of(queries, batch_size, pad), device)
    return cosine_matrix(train_rep, query_rep).numpy()


def doc_scores(window_scores: np.ndarray, window_docs: list[str], doc_ids: list[str], how: str) -> np.ndarray:
    """``(num_docs, Q)`` from ``(num_windows, Q)``: ``sum`` (influence) or ``max`` (similarity) over windows."""
    index = {d: i for i, d in enumerate(doc_ids)}
    fill = 0.0 if how == "sum" else -np.inf
    out = np.full((len(doc_ids), window_scores.shape[1]), fill, dtype=np.float64)
    for row, doc in enumerate(window_docs):
        i = index[doc]
        out[i] = out[i] + window_scores[row] if how == "sum" else np.maximum(out[i], window_scores[row])
    out[~np.isfinite(out)] = -1e300  # documents without windows rank last
    return out


def document_methods(window_scores: dict[str, np.ndarray], similarity: np.ndarray, window_docs: list[str],
                     doc_ids: list[str]) -> dict[str, np.ndarray]:
    """Document scores of the gradient methods and RepSim: influence sums over windows, similarity takes the max."""
    methods = {n: doc_scores(window_scores[n], window_docs, doc_ids, "sum")
               for n in ("ekfac", "ekfac_projected", "grad_dot")}
    methods["grad_cos"] = doc_scores(window_scores["grad_cos"], window_docs, doc_ids, "max")
    methods["repsim"] = doc_scores(similarity, window_docs, doc_ids, "max")
    return methods


def chance_scores(shape: tuple[int, int], draws: int, seed: int):
    """``draws`` random score matrices (a random ranking per query each)."""
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        yield rng.standard_normal(shape)


def method_table(methods: dict[str, np.ndarray], metric_fn, chance_shape, draws: int, seed: int) -> dict:
    """``metric_fn(scores) -> dict`` for every method, plus ``chance`` averaged over random draws."""
    out = {name: metric_fn(s) for name, s in methods.items()}
    runs = [metric_fn(s) for s in chance_scores(chance_shape, draws, seed)]
    out["chance"] = _average_dicts(runs)
    return out


def _average_dicts(runs: list[dict]):
    """Elementwise mean of nested dicts of numbers (None/NaN left out)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _average_dicts([r[k] for r in runs]) for k in first}
    if isinstance(first, int) and not isinstance(first, bool) and all(r == first for r in runs):
        return first  # counts (e.g. n_facts) are the same in every draw
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return metrics.nanmean([float(r) for r in runs if r is not None])
    return first


def repeated_queries(queries: QueryGradients, count: int) -> QueryGradients:
    """Low-rank ``queries`` repeated (in order) to exactly ``count`` queries: timing at a query count."""
    reps = QueryGradients.concat([queries] * -(-count // len(queries.query_ids)))
    return QueryGradients(reps.query_ids[:count], left={n: t[:count] for n, t in reps.left.items()},
                          right={n: t[:count] for n, t in reps.right.items()})


def agreement(scores: np.ndarray, reference: np.ndarray, k: int) -> dict:
    """Mean over queries of Spearman and top-k overlap (proponents) of ``(N, Q)`` against a reference."""
    q = scores.shape[1]
    rho = [metrics.spearman(scores[:, i], reference[:, i]) for i in range(q)]
    overlap = [metrics.topk_overlap(scores[:, i], reference[:, i], k) for i in range(q)]
    return {"spearman": metrics.nanmean(rho), "topk_overlap": float(np.mean(overlap)), "k": k,
            "spearman_min": float(np.nanmin(rho)) if not all(math.isnan(r) for r in rho) else None}
