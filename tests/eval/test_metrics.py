"""Metrics against hand-computed cases (the computation is written beside each)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.metrics import (
    auprc,
    average_precision,
    average_ranks,
    lds,
    lds_per_query,
    mrr,
    precision_at_k,
    ranking,
    recall_at_k,
    spearman,
    strict_recall,
    topk_overlap,
)

RANKED = ["a", "b", "c", "d", "e", "f"]
GOLD = {"b", "e", "z"}  # "z" is never ranked


def test_ranking_orders_by_score_and_breaks_ties_by_position():
    # scores: a=1, b=3, c=3, d=0 -> b (3, first), c (3, second), a (1), d (0)
    assert ranking(["a", "b", "c", "d"], [1.0, 3.0, 3.0, 0.0]) == ["b", "c", "a", "d"]


def test_recall_at_k():
    # top-2 = {a, b}: one of three gold -> 1/3
    assert recall_at_k(RANKED, GOLD, 2) == pytest.approx(1 / 3)
    # top-5 = {a..e}: b and e -> 2/3
    assert recall_at_k(RANKED, GOLD, 5) == pytest.approx(2 / 3)
    # k beyond the list: still 2/3 (z is never found)
    assert recall_at_k(RANKED, GOLD, 100) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_k(RANKED, set(), 3)


def test_strict_recall_is_recall_at_number_of_gold():
    # |gold| = 3 -> top-3 = {a, b, c}: only b -> 1/3
    assert strict_recall(RANKED, GOLD) == pytest.approx(1 / 3)
    # gold {a, b} in the first two places -> 2/2 = 1
    assert strict_recall(RANKED, {"a", "b"}) == 1.0
    # gold {a, c}: top-2 = {a, b} holds a only -> 1/2
    assert strict_recall(RANKED, {"a", "c"}) == 0.5


def test_mrr():
    # first gold item is b at rank 2 -> 1/2
    assert mrr(RANKED, GOLD) == 0.5
    # first gold f at rank 6 -> 1/6
    assert mrr(RANKED, {"f"}) == pytest.approx(1 / 6)
    # no gold ranked -> 0
    assert mrr(RANKED, {"z"}) == 0.0


def test_precision_at_k():
    # top-2 = {a, b}: 1 gold of 2 -> 0.5
    assert precision_at_k(RANKED, GOLD, 2) == 0.5
    # top-5: b, e -> 2/5
    assert precision_at_k(RANKED, GOLD, 5) == pytest.approx(0.4)
    # k = 10 > 6 items: 2 hits / 10 (missing places count as misses)
    assert precision_at_k(RANKED, GOLD, 10) == pytest.approx(0.2)


def test_average_precision_hand_computed():
    # scores rank the items: i0 (0.9), i1 (0.8), i2 (0.7), i3 (0.6), i4 (0.5)
    # labels:               1          0          1          0          1
    # precision at each positive: 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3 = 0.7555...
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 0, 1, 0, 1]
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # Shuffled order of the same items gives the same AP.
    perm = [3, 0, 4, 2, 1]
    assert auprc([scores[i] for i in perm], [labels[i] for i in perm]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # All positives first -> 1.
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0
    # The only positive last of 4 -> precision 1/4.
    assert average_precision([4, 3, 2, 1], [0, 0, 0, 1]) == 0.25
    with pytest.raises(ValueError):
        average_precision([1, 2], [0, 0])


def test_topk_overlap():
    a = [5.0, 4.0, 3.0, 2.0, 1.0]  # top-2 = {0, 1}, top-3 = {0, 1, 2}
    b = [5.0, 0.0, 4.0, 3.0, 1.0]  # top-2 = {0, 2}, top-3 = {0, 2, 3}
    assert topk_overlap(a, b, 2) == 0.5  # {0} -> 1/2
    assert topk_overlap(a, b, 3) == pytest.approx(2 / 3)  # {0, 2} -> 2/3
    assert topk_overlap(a, a, 3) == 1.0
    assert topk_overlap(a, b, 10) == 1.0  # k capped at 5 items: all of them


def test_average_ranks_with_ties():
    # values 10, 20, 20, 5 -> sorted 5 (1), 10 (2), 20 20 (3 and 4 -> 3.5 each)
    np.testing.assert_allclose(average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_spearman_hand_computed_and_against_scipy():
    # x = 1 2 3 4, y = 1 3 2 4: ranks equal the values; d = 0 -1 1 0, sum d^2 = 2
    # rho = 1 - 6 * 2 / (4 * (16 - 1)) = 1 - 12/60 = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # Constant input: undefined.
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_lds_hand_computed():
    # 3 training items, 3 subsets, 1 query.
    # scores = [1, 2, 4]; subsets {0,1} -> 3, {1,2} -> 6, {0,2} -> 5: predicted = [3, 6, 5]
    scores = np.array([[1.0, 2.0, 4.0]])
    subsets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    # measured ranks like predicted (3 < 5 < 6) -> rho = 1
    assert lds(scores, subsets, np.array([[0.1, 0.9, 0.5]])) == pytest.approx(1.0)
    # measured = [0.1, 0.5, 0.9]: ranks 1 2 3 vs predicted ranks 1 3 2
    # d = 0 -1 1 -> rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert lds(scores, subsets, np.array([[0.1, 0.5, 0.9]])) == pytest.approx(0.5)
    # Two queries: the mean of their LDS (1 and 0.5 -> 0.75); a constant query is left out.
    two = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    measured = np.array([[0.1, 0.9, 0.5], [0.1, 0.5, 0.9], [1.0, 2.0, 3.0]])
    per_query = lds_per_query(two, subsets, measured)
    assert per_query[:2].tolist() == pytest.approx([1.0, 0.5]) and math.isnan(per_query[2])
    assert lds(two, subsets, measured) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes"):
        lds(scores, subsets, np.array([[0.1, 0.9]]))
