"""The fidelity-and-cost sweep (benchmarks.evaluate.sweep) and the default rule, on a tiny Llama (fast tier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.text import batches_of
from benchmarks.evaluate.config import EvaluateConfig
from benchmarks.evaluate.sweep import RssSampler, choose_default, run_sweep, sweep_settings
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.errors import ConfigError
from tests.helpers import TINY_PAD, random_queries, random_sequences, tiny_model


@pytest.fixture(scope="module")
def swept():
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float32)
    train = batches_of(random_sequences(12), 4, TINY_PAD)
    queries = random_queries(3)
    # Rank 24 is full rank for every tracked layer (16 x 24 and 24 x 16): it must equal exact.
    settings = sweep_settings(["sketch", "curvature"], [4], [2, 24], seed=0)
    base = InfluenceConfig(damping=1e-3)
    out = run_sweep(model, base, settings, train, batches_of(queries, 4, TINY_PAD), [q.doc_id for q in queries],
                    torch.device("cpu"), top_k=3, cost_batches=2)
    return model, base, train, queries, out


def test_sweep_rows_scores_and_costs(swept):
    _, _, train, queries, out = swept
    names = [r["name"] for r in out["rows"]]
    assert names == ["exact", "rank-2", "rank-24", "sketch-4", "curvature-4"]
    assert out["fidelity_windows"] == 12 and out["cost_windows"] == 8
    for name in [*names, "grad_dot", "grad_cos"]:
        assert out["scores"][name].shape == (12, 3)
        assert np.isfinite(out["scores"][name]).all()
    by = {r["name"]: r for r in out["rows"]}
    assert by["exact"]["spearman"] == pytest.approx(1.0) and by["exact"]["topk_overlap"] == 1.0
    np.testing.assert_allclose(out["scores"]["rank-24"], out["scores"]["exact"], rtol=1e-4, atol=1e-6)
    assert by["rank-24"]["topk_overlap"] == 1.0
    for row in out["rows"]:
        assert row["score_s"] > 0 and row["score_to_ceiling"] > 0 and row["peak_rss_mib"] > 0
        assert row["fit_ceiling_passes"] >= row["fit_passes_without_eigh"] > 0
    # Settings on the exact factors do not refit; curvature fits its own.
    assert by["rank-2"]["fit_shared_with_exact"] and by["sketch-4"]["fit_shared_with_exact"]
    assert not by["curvature-4"]["fit_shared_with_exact"] and not by["exact"]["fit_shared_with_exact"]
    assert by["rank-2"]["query_bytes"] < by["exact"]["query_bytes"]


def test_sweep_exact_scores_equal_an_engine_of_their_own(swept):
    """The shared-capture exact scores are what a standalone engine fitted on the same windows gives."""
    model, base, train, queries, out = swept
    engine = InfluenceEngine(model, base, "cpu")
    factors = engine.fit(train)
    q = engine.query_gradients(batches_of(queries, 4, TINY_PAD), factors, [s.doc_id for s in queries])
    want = torch.cat([engine.score_batch(b, q) for b in train]).double().numpy()
    np.testing.assert_allclose(out["scores"]["exact"], want, rtol=1e-4, atol=1e-6)


def _row(name, kind, overlap, speed, rank=0, dim=0):
    return {"name": name, "kind": kind, "mode": kind if kind in ("sketch", "curvature") else None, "dim": dim,
            "query_rank": rank, "topk_overlap": overlap, "spearman": overlap, "score_tokens_per_s": speed,
            "score_to_ceiling": speed / 100}


def test_choose_default_rule():
    rows = [_row("exact", "exact", 1.0, 90), _row("rank-8", "rank", 0.9, 120, rank=8),
            _row("rank-32", "rank", 0.97, 110, rank=32), _row("rank-64", "rank", 0.99, 100, rank=64),
            _row("curvature-64", "curvature", 0.8, 150, dim=64), _row("curvature-256", "curvature", 0.96, 130, dim=256),
            _row("sketch-256", "sketch", 0.97, 125, dim=256)]
    # A qualifying projected setting: the fastest of them.
    assert choose_default(rows, 0.95)["name"] == "curvature-256"
    # None projected qualifies: the lowest qualifying query rank, even if a higher rank were faster.
    assert choose_default(rows, 0.975)["name"] == "rank-64"
    assert choose_default([r for r in rows if r["kind"] != "curvature"][:3], 0.95)["name"] == "rank-32"
    # Nothing qualifies but exact itself.
    chosen = choose_default(rows[:2], 0.95)
    assert chosen["name"] == "exact" and chosen["qualifying"] == ["exact"]


def test_rss_sampler_sees_an_allocation():
    with RssSampler(interval=0.005) as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    assert rss.peak_mib - rss.start_mib > 32
    del block


@pytest.mark.parametrize("override, message", [
    ({"world": "gpt9"}, "world must be one of"),
    ({"smollm2": {"min_topk_overlap": 1.5}}, "smollm2.min_topk_overlap"),
    ({"smollm2": {"dims": [0]}}, "smollm2.dims"),
    ({"smollm2": {"modes": ["random"]}}, "smollm2.modes"),
    ({"smollm2": {"cost_batches": -1}}, "smollm2.cost_batches"),
])
def test_evaluate_config_smollm2_keys_are_validated(override, message):
    cfg = EvaluateConfig()
    for key, value in override.items():
        if isinstance(value, dict):
            for k, v in value.items():
                setattr(cfg.smollm2, k, v)
        else:
            setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_repeated_queries_cycle_to_the_count():
    from benchmarks.evaluate.scoring import repeated_queries
    from pipeline.core.queries import QueryGradients

    left = {"l": torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)}
    right = {"l": -torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2)}
    out = repeated_queries(QueryGradients(["a", "b", "c"], left=left, right=right), 7)
    assert out.query_ids == ["a", "b", "c", "a", "b", "c", "a"]
    order = [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(out.left["l"], left["l"][order]) and torch.equal(out.right["l"], right["l"][order])
