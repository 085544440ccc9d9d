"""The gradient store's numbers (pipeline.core.store) against autograd loops and the engine's scores (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.core.forward import sequence_losses
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.core.store import StoreBasis, kept_directions, layer_scores, store_scores
from pipeline.core.text import batches_of, collate
from pipeline.core.tracking import weight_gradient
from tests.helpers import TINY_PAD, random_queries, random_sequences, tiny_model

TOL = 1e-10


def _setup(family="gpt2", projection=ProjectionSpec(0), rank=0):
    model = tiny_model(family)
    engine = InfluenceEngine(model, InfluenceConfig(projection=projection, precision="float64", damping=1e-3,
                                                    empirical_fisher=True, query_rank=rank))
    train = random_sequences(10, seed=3)
    factors = engine.fit(list(batches_of(train, 4, TINY_PAD)))
    queries = engine.query_gradients(batches_of(random_queries(3), 4, TINY_PAD), factors, ["a", "b", "c"])
    return model, engine, train, factors, queries


def test_kept_directions_are_the_rows_and_columns_of_lambda_with_most_mass():
    lam = torch.tensor([[1.0, 5.0, 0.0], [9.0, 0.0, 0.0], [0.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    rows, cols = kept_directions(lam, 2)
    assert rows.tolist() == [1, 0]  # row sums 6, 9, 2, 6: 9 first, then the tie 6/6 by index
    assert cols.tolist() == [0, 1]  # column sums 12, 8, 3
    rows, cols = kept_directions(lam, 3)
    assert rows.tolist() == [1, 0, 3] and cols.tolist() == [0, 1, 2]
    rows, cols = kept_directions(lam, 10)  # capped by the sizes
    assert len(rows) == 4 and len(cols) == 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_window_blocks_equal_rotated_truncated_autograd_gradients(family):
    model, engine, train, factors, _ = _setup(family)
    basis = StoreBasis.from_factors(factors, dim=5)
    captured, _ = engine.capture_batch(collate(train[:4], TINY_PAD), projected=True)
    rows = basis.window_blocks(captured)
    assert rows.shape == (4, basis.width)
    for i, seq in enumerate(train[:4]):
        ref = copy.deepcopy(model).requires_grad_(True)
        sequence_losses(ref, collate([seq], TINY_PAD)).sum().backward()
        modules = dict(ref.named_modules())
        expected = []
        for name, spec in engine.layers.items():
            grad = weight_gradient(modules[name], spec)  # (d_out, d_in), bias column last
            r, c = kept_directions(factors.lambdas[name], 5)
            expected.append((factors.q_s[name].T @ grad @ factors.q_a[name])[r][:, c].flatten())
        torch.testing.assert_close(rows[i], torch.cat(expected), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("rank", [0, 2])
def test_with_every_direction_kept_store_scores_equal_the_engine(rank):
    _, engine, train, factors, queries = _setup(rank=rank)
    dim = max(max(s.d_out, s.d_in) for s in engine.layers.values())
    basis = StoreBasis.from_factors(factors, dim)
    batch = collate(train, TINY_PAD)
    captured, _ = engine.capture_batch(batch, projected=True)
    got = store_scores(basis.window_blocks(captured).to(torch.float64), basis.query_blocks(queries))
    expected = engine.score_batch(batch, queries)
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_curvature_mode_with_dim_at_least_the_projection_is_the_full_pass():
    _, engine, train, factors, queries = _setup(projection=ProjectionSpec(6, mode="curvature"), rank=2)
    basis = StoreBasis.from_factors(factors, 6)
    assert basis.shapes() == [(6, 6)] * len(engine.layers)
    batch = collate(train, TINY_PAD)
    captured, _ = engine.capture_batch(batch, projected=True)
    rows = basis.window_blocks(captured)
    q = basis.query_blocks(queries)
    expected = engine.score_batch(batch, queries)
    torch.testing.assert_close(rows @ q.T, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    per_layer = layer_scores(rows, q, basis.offsets())
    torch.testing.assert_close(per_layer.sum(-1).to(torch.float64), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())


def test_truncated_score_is_both_gradients_projected_onto_the_kept_subspaces():
    _, engine, train, factors, queries = _setup(rank=0)
    basis = StoreBasis.from_factors(factors, 3)
    batch = collate(train, TINY_PAD)
    captured, _ = engine.capture_batch(batch, projected=True)
    got = basis.window_blocks(captured) @ basis.query_blocks(queries).T
    expected = torch.zeros_like(got)
    from pipeline.core.ekfac import per_sequence_gradients

    for name in engine.layers:
        p_s = basis.q_s[name] @ basis.q_s[name].T  # orthogonal projector onto the kept S directions
        p_a = basis.q_a[name] @ basis.q_a[name].T
        grads = per_sequence_gradients(captured[name])  # (B, d_out, d_in)
        pre = p_s @ queries.dense[name] @ p_a  # (Q, d_out, d_in)
        expected += grads.flatten(1) @ pre.flatten(1).T
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL * expected.abs().max().item())
    assert not torch.allclose(got, engine.score_batch(batch, queries))  # truncated: not the full score


def test_basis_round_trips_through_tensors():
    _, _, _, factors, _ = _setup()
    basis = StoreBasis.from_factors(factors, 4)
    back = StoreBasis.from_tensors(basis.layers, basis.to_tensors())
    assert back.layers == basis.layers and back.width == basis.width
    for n in basis.layers:
        assert torch.equal(back.q_s[n], basis.q_s[n]) and torch.equal(back.q_a[n], basis.q_a[n])
