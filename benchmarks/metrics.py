"""Retrieval and attribution-quality metrics: pure functions on scores and rankings.

Rankings are lists of item ids, strongest first. Scores are 1-D sequences
aligned with a list of items; a higher score ranks higher, and ties are
broken by position (earlier first), so every function here is deterministic.

Definitions (``gold``: the set of relevant items of one query):

- ``recall_at_k``: ``|top_k ∩ gold| / |gold|``.
- ``strict_recall``: recall at ``k = |gold|`` (R-precision): all gold items
  must occupy the first ``|gold|`` places for a score of 1.
- ``mrr``: reciprocal rank of the first gold item (0 when none is ranked).
- ``precision_at_k``: ``|top_k ∩ gold| / k``.
- ``average_precision`` (``auprc``): mean over gold items of the precision at
  each gold item's rank; the step-wise area under the precision-recall curve.
- ``topk_overlap``: ``|top_k(a) ∩ top_k(b)| / k`` for two score vectors.
- ``spearman``: Pearson correlation of average ranks (ties get their mean rank).
- ``lds``: linear datamodeling score (Ilyas et al. 2022, TRAK; dattri): per
  query, Spearman across subsets between the summed attribution scores of
  each subset and the measured output of a model retrained on it; averaged
  over queries.

No scipy at run time: ``spearman`` is implemented on numpy and tested
against ``scipy.stats.spearmanr`` in ``tests/eval/test_metrics.py``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np


def rank_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices of ``scores`` from highest to lowest; ties keep their original order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    return np.argsort(-s, kind="stable")


def ranking(ids: Sequence, scores: Sequence[float] | np.ndarray) -> list:
    """``ids`` ordered by ``scores``, strongest first (ties by position)."""
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    return [ids[i] for i in rank_order(scores)]


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def recall_at_k(ranked: Sequence, gold: Collection, k: int) -> float:
    """Share of the gold items found in the first ``k`` of ``ranked``."""
    gold = set(gold)
    if not gold:
        raise ValueError("recall is undefined without gold items")
    return len(gold.intersection(ranked[: _check_k(k)])) / len(gold)


def strict_recall(ranked: Sequence, gold: Collection) -> float:
    """Recall at ``k = |gold|`` (R-precision)."""
    return recall_at_k(ranked, gold, len(set(gold)))


def precision_at_k(ranked: Sequence, gold: Collection, k: int) -> float:
    """Share of the first ``k`` of ``ranked`` that are gold (``k`` larger than the list counts misses)."""
    return len(set(gold).intersection(ranked[: _check_k(k)])) / k


def mrr(ranked: Sequence, gold: Collection) -> float:
    """Reciprocal rank of the first gold item; 0 when no gold item is ranked."""
    gold = set(gold)
    for position, item in enumerate(ranked, 1):
        if item in gold:
            return 1.0 / position
    return 0.0


def average_precision(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """AUPRC as average precision: ``(1/|P|) sum over positives of precision at their rank``.

    ``labels`` marks the relevant items (aligned with ``scores``). Ties are
    broken by position, as everywhere in this module.
    """
    y = np.asarray(labels, dtype=bool)
    if y.shape != np.shape(scores):
        raise ValueError(f"labels {y.shape} and scores {np.shape(scores)} differ in shape")
    if not y.any():
        raise ValueError("average precision is undefined without positive items")
    hits = y[rank_order(scores)]
    cumulative = np.cumsum(hits)
    positions = np.arange(1, len(hits) + 1)
    return float((cumulative[hits] / positions[hits]).mean())


auprc = average_precision


def topk_overlap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, k: int) -> float:
    """``|top_k(a) ∩ top_k(b)| / k`` for two score vectors over the same items."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score vectors differ in shape: {a.shape} vs {b.shape}")
    k = min(_check_k(k), len(a))
    return len(set(rank_order(a)[:k].tolist()) & set(rank_order(b)[:k].tolist())) / k


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, ascending; tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Runs of equal values: each gets the mean of the positions it spans.
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant or has fewer than two items."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D vectors of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman got non-finite values")
    if len(x) < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if denom == 0.0:
        return math.nan
    return float((rx * ry).sum() / denom)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def lds_per_query(scores: np.ndarray, subsets: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Per-query LDS: Spearman across subsets of predicted vs measured outputs.

    ``scores``: ``(Q, N)`` attribution scores of N training items; ``subsets``:
    ``(M, N)`` 0/1 membership of each retraining subset; ``measured``:
    ``(Q, M)`` the query output of the model retrained on each subset. The
    prediction for subset ``j`` is ``sum_{i in S_j} scores[q, i]``. NaN where
    undefined (e.g. constant predictions).
    """
    scores = np.asarray(scores, dtype=np.float64)
    subsets = np.asarray(subsets, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if scores.ndim != 2 or subsets.ndim != 2 or measured.ndim != 2:
        raise ValueError("lds needs scores (Q, N), subsets (M, N) and measured (Q, M)")
    if subsets.shape[1] != scores.shape[1] or measured.shape != (scores.shape[0], subsets.shape[0]):
        raise ValueError(
            f"lds shapes disagree: scores {scores.shape}, subsets {subsets.shape}, measured {measured.shape}"
        )
    predicted = scores @ subsets.T  # (Q, M)
    return np.array([spearman(predicted[q], measured[q]) for q in range(scores.shape[0])])


def lds(scores: np.ndarray, subsets: np.ndarray, measured: np.ndarray) -> float:
    """Mean over queries of ``lds_per_query`` (queries where it is undefined are left out)."""
    return nanmean(lds_per_query(scores, subsets, measured).tolist())
