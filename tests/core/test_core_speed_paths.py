"""Exact EK-FAC at speed: the cheaper paths chosen by shape equal the plain ones (float64).

Rotation (Lambda pass, query preconditioning): per token vs per sequence.
Covariance products: blocked symmetric Gram vs ``x^T x``; padding skipped
vs every position multiplied.
Low-rank scoring: per token vs through the per-sequence gradient. Query
gradients: layer by layer and batch by batch vs all at once. Memory checked
before query gradients are formed. Lambda fitted on a subset of shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from pipeline.config import AttributeConfig, ConfigError
from pipeline.core import queries as queries_module
from pipeline.core import ekfac as ekfac_module
from pipeline.core.ekfac import (
    CovarianceSums,
    LambdaSums,
    eigendecompose,
    gram,
    per_sequence_gradients,
    rotated_gradients,
    rotation_path,
)
from pipeline.core.influence import InfluenceConfig, InfluenceEngine, QueryMemoryError, fast_bfloat16, fast_int8
from pipeline.core.queries import low_rank, scoring_path
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import batches_of, collate
from pipeline.core.tracking import Captured
from pipeline.corpus import Shard, hash_sample, spread
from pipeline.identity import FactorsKey
from pipeline.context import RunContext, lambda_subset
from pipeline.pinning import settings_id
from tests.helpers import TINY_PAD, random_queries, random_sequences, tiny_model

TOL = 1e-10
PROJECTIONS = [ProjectionSpec(0), ProjectionSpec(6, mode="sketch"), ProjectionSpec(6, mode="curvature")]


def fitted(family="gpt2", projection=ProjectionSpec(0), rank=0, **kw):
    engine = InfluenceEngine(
        tiny_model(family), InfluenceConfig(projection=projection, precision="float64", query_rank=rank, **kw)
    )
    return engine, engine.fit(batches_of(random_sequences(8, seed=11), 4, TINY_PAD))


def query_matrices(q, name):
    """``(Q, k_out, k_in)`` query matrices of one layer, dense or rebuilt from low-rank factors."""
    return q.dense[name] if name in q.dense else q.left[name] @ q.right[name].transpose(1, 2)


def test_rotation_path_is_chosen_by_shape():
    # A 576 x 1536 layer (SmolLM2's MLP): short windows rotate tokens, long ones the sequence gradient.
    assert rotation_path(64, 1536, 576) == "token"
    assert rotation_path(512, 1536, 576) == "token"
    assert rotation_path(2048, 1536, 576) == "sequence"
    assert scoring_path(64, 1536, 576, 100 * 8) == "token"
    assert scoring_path(2048, 1536, 576, 100 * 32) == "sequence"


def test_rotation_paths_agree_on_random_vectors():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 7, 9, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    q_s = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))[0]
    c = Captured(a, g)
    expected = q_s.T @ torch.einsum("bto,bti->boi", g, a) @ q_a
    for path in ("token", "sequence"):
        torch.testing.assert_close(rotated_gradients(c, q_s, q_a, path), expected, rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match="rotation path"):
        rotated_gradients(c, q_s, q_a, "diagonal")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rotation_paths_give_the_same_lambda(family):
    engine = InfluenceEngine(tiny_model(family), InfluenceConfig(precision="float64", empirical_fisher=True))
    train = batches_of(random_sequences(8, seed=12), 4, TINY_PAD, padding_side="left")
    bases = eigendecompose(engine.covariance_sums(train))
    sums = {}
    for path in ("token", "sequence"):
        lam = LambdaSums.zeros(engine.space_dims(False))
        for batch in train:
            captured, _ = engine.capture_batch(batch, projected=False)
            lam.update(captured, bases, batch.input_ids.shape[0], path=path)
        sums[path] = lam
    default = engine.lambda_sums(train, bases)
    for name in engine.layers:
        torch.testing.assert_close(sums["token"].sums[name], sums["sequence"].sums[name], rtol=TOL, atol=TOL)
        torch.testing.assert_close(default.sums[name], sums["sequence"].sums[name], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("rank", [0, 3])
def test_rotation_paths_give_the_same_preconditioned_queries(projection, rank):
    engine, factors = fitted("neox", projection, rank)
    queries = random_queries(5)
    ids = [s.doc_id for s in queries]
    token = engine.query_gradients(batches_of(queries, 2, TINY_PAD), factors, ids, path="token")
    sequence = engine.query_gradients(batches_of(queries, 2, TINY_PAD), factors, ids, path="sequence")
    for name in engine.layers:
        torch.testing.assert_close(query_matrices(token, name), query_matrices(sequence, name), rtol=1e-9, atol=TOL)


def previous_query_gradients(engine, batches, factors, rank):
    """The former all-at-once computation: every layer's dense H^-1 G for every query, then a truncated SVD."""
    parts = {n: [] for n in engine.layers}
    projected_fit = engine.config.factor_space == "projected"
    for batch in batches:
        captured, _ = engine.capture_batch(batch, projected_fit, "data")
        for name, c in captured.items():
            pre = factors.precondition(name, per_sequence_gradients(c), engine.config.damping)
            if engine.projector is not None and not projected_fit:
                pre = engine.projector.project_matrix(name, pre)
            parts[name].append(pre)
    dense = {n: torch.cat(p, 0) for n, p in parts.items()}
    if rank == 0:
        return dense
    out = {}
    for name, d in dense.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        out[name] = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
    return out


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("rank", [0, 2, 64])
def test_query_gradients_layer_by_layer_equal_the_all_at_once_result(projection, rank):
    engine, factors = fitted("gpt2", projection, rank)
    queries = random_queries(5)
    batches = batches_of(queries, 2, TINY_PAD)
    got = engine.query_gradients(batches, factors, [s.doc_id for s in queries])
    expected = previous_query_gradients(engine, batches, factors, rank)
    for name in engine.layers:
        torch.testing.assert_close(query_matrices(got, name), expected[name], rtol=1e-8, atol=1e-10)


def test_low_rank_is_the_truncated_svd_on_either_side():
    gen = torch.Generator().manual_seed(1)
    for shape in [(3, 9, 5), (3, 5, 9)]:
        m = torch.randn(*shape, generator=gen, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        for r in (1, 3, 5):
            left, right = low_rank(m, r)
            assert left.shape == (3, shape[1], r) and right.shape == (3, shape[2], r)
            expected = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
            torch.testing.assert_close(left @ right.transpose(1, 2), expected, rtol=1e-9, atol=1e-12)


def test_low_rank_on_wide_layers_uses_the_range_finder_near_the_truncated_svd():
    """Rank 8 of 200 x 120 matrices takes the seeded randomized path (2 * (8 + 10) < 120)."""
    gen = torch.Generator().manual_seed(2)
    for shape in [(2, 200, 120), (2, 120, 200)]:
        u, _ = torch.linalg.qr(torch.randn(2, shape[1], 120, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(2, shape[2], 120, generator=gen, dtype=torch.float64))
        spectrum = 0.8 ** torch.arange(120, dtype=torch.float64)  # decaying, as preconditioned gradients' do
        m = (u * spectrum) @ v.transpose(1, 2)
        left, right = low_rank(m, 8)
        assert left.shape == (2, shape[1], 8) and right.shape == (2, shape[2], 8)
        best = spectrum[8:].norm()  # Eckart-Young: the truncated SVD's Frobenius error
        err = (m - left @ right.transpose(1, 2)).norm(dim=(1, 2))
        assert torch.all(err <= 1.01 * best), (err, best)
        again = low_rank(m, 8)
        assert torch.equal(again[0], left) and torch.equal(again[1], right)  # seeded: deterministic
        # float32 (production): the range finder runs in float32, its rounding far below the truncation error
        left32, right32 = low_rank(m.float(), 8)
        assert left32.dtype == right32.dtype == torch.float32
        err32 = (m - (left32 @ right32.transpose(1, 2)).double()).norm(dim=(1, 2))
        assert torch.all(err32 <= 1.01 * best), (err32, best)
        # bfloat16 power iterations (score.product_dtype): they only choose the subspace; the factors stay
        # float32 and as near the truncated SVD
        left16, right16 = low_rank(m.float(), 8, products=torch.bfloat16)
        assert left16.dtype == right16.dtype == torch.float32
        err16 = (m - (left16 @ right16.transpose(1, 2)).double()).norm(dim=(1, 2))
        assert torch.all(err16 <= 1.01 * best), (err16, best)
        assert not torch.equal(left16, left32)  # the products did change
        exact_rank = (u[..., :6] * spectrum[:6]) @ v[..., :6].transpose(1, 2)
        left, right = low_rank(exact_rank, 8)
        torch.testing.assert_close(left @ right.transpose(1, 2), exact_rank, rtol=1e-9, atol=1e-12)


def test_orthonormal_spans_the_columns_and_falls_back_to_householder_when_ill_conditioned(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    calls = []
    householder = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda y: calls.append(y.shape) or householder(y))
    u, _ = householder(torch.randn(3, 60, 12, generator=gen, dtype=torch.float64))
    v, _ = householder(torch.randn(3, 12, 12, generator=gen, dtype=torch.float64))
    cases = {
        "well conditioned": (torch.randn(3, 60, 12, generator=gen), False),
        "float32, condition 1e2": (((u * torch.logspace(0, -2, 12, dtype=torch.float64)) @ v).float(), False),
        # float32 CholeskyQR2 holds to about 4e3 (u^-1/2); float64's to about 1e8
        "float32, condition 1e4": (((u * torch.logspace(0, -4, 12, dtype=torch.float64)) @ v).float(), True),
        "float64, condition 1e4": ((u * torch.logspace(0, -4, 12, dtype=torch.float64)) @ v, False),
        "float64, condition 1e7": ((u * torch.logspace(0, -7, 12, dtype=torch.float64)) @ v, True),
        "rank 5 of 12": (torch.randn(3, 60, 5, generator=gen) @ torch.randn(3, 5, 12, generator=gen), True),
        "zero": (torch.zeros(2, 30, 4), True),
        # repeated columns: singular in bfloat16 too; Householder has no bfloat16 kernel, so float32 inside
        "bfloat16, 6 columns twice": (torch.randn(3, 60, 6, generator=gen).bfloat16().repeat(1, 1, 2), True),
    }
    for case, (y, falls_back) in cases.items():
        calls.clear()
        q = queries_module.orthonormal(y)
        assert q.dtype == y.dtype and q.shape == y.shape, case
        assert bool(calls) == falls_back, case  # a mutation of the condition check fails one of these
        if falls_back:
            continue
        eye = torch.eye(y.shape[-1], dtype=y.dtype)
        tol = 1e-12 if y.dtype == torch.float64 else 1e-5  # computed in float32 unless y is float64
        torch.testing.assert_close(q.mT @ q, eye.expand_as(q.mT @ q), atol=tol, rtol=0)
        # the same column space as Householder's basis: projecting y onto it changes nothing
        torch.testing.assert_close(q @ (q.mT @ y), y, atol=tol * float(y.abs().max()), rtol=0)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("chunk", [queries_module.SCORING_CHUNK_ELEMENTS, 1])
def test_low_rank_scoring_at_full_rank_equals_dense_on_both_paths(projection, chunk, monkeypatch):
    engine, factors = fitted("llama", projection, 0)
    queries = random_queries(3)
    ids = [s.doc_id for s in queries]
    dense = engine.query_gradients(batches_of(queries, 3, TINY_PAD), factors, ids)
    full_rank = replace(engine.config, query_rank=64)
    low_engine = InfluenceEngine(engine.model, full_rank)
    low = low_engine.query_gradients(batches_of(queries, 3, TINY_PAD), factors, ids)
    assert low.left and not low.dense
    monkeypatch.setattr(queries_module, "SCORING_CHUNK_ELEMENTS", chunk)  # chunk=1: one query per step
    captured, _ = engine.capture_batch(collate(random_sequences(4, seed=13), pad_id=1), projected=True)
    for name in engine.layers:
        expected = dense.layer_scores(name, captured[name])
        for path in ("token", "sequence"):
            got = low.layer_scores(name, captured[name], path=path)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="scoring path"):
        low.layer_scores(name, captured[name], path="diagonal")


@pytest.mark.parametrize("width", [5, 13, 16])
def test_blocked_gram_equals_the_plain_product_and_is_exactly_symmetric(width, monkeypatch):
    x = torch.randn(7, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    monkeypatch.setattr(ekfac_module, "GRAM_MIN_WIDTH", 8)  # 13 and 16 take the blocked path (uneven, even)
    got = gram(x)
    torch.testing.assert_close(got, x.T @ x, rtol=TOL, atol=TOL)
    assert torch.equal(got, got.T)


def test_padding_is_skipped_and_every_sum_is_unchanged():
    """Covariances, Lambda's per-token rotation and low-rank token scores multiply real tokens only.

    Each equals the same sum over every position (padding's vectors are zero) computed without the mask.
    """
    engine, factors = fitted("llama", ProjectionSpec(0), 3)
    batch = collate(random_sequences(4, seed=13), pad_id=TINY_PAD)
    assert not bool(batch.attention_mask.bool().all())  # the batch has padding
    captured, _ = engine.capture_batch(batch, projected=True)
    sums = CovarianceSums.zeros(engine.space_dims(False))
    sums.update(captured, batch.attention_mask)
    queries = engine.query_gradients(batches_of(random_queries(3), 3, TINY_PAD), factors, ["a", "b", "c"])
    for name, c in captured.items():
        assert c.real_tokens() is not None and len(c.real_tokens()) == int(batch.attention_mask.sum())
        everywhere = Captured(c.a, c.g)  # no mask: every position multiplied
        torch.testing.assert_close(sums.a_sum[name], torch.einsum("bti,btj->ij", c.a, c.a), rtol=TOL, atol=TOL)
        torch.testing.assert_close(sums.s_sum[name], torch.einsum("bto,btp->op", c.g, c.g), rtol=TOL, atol=TOL)
        q_s, q_a = factors.bases(name, c.g)
        torch.testing.assert_close(rotated_gradients(c, q_s, q_a, "token"),
                                   rotated_gradients(everywhere, q_s, q_a, "token"), rtol=TOL, atol=TOL)
        got = queries.token_scores(name, c)
        torch.testing.assert_close(got, queries.token_scores(name, everywhere), rtol=TOL, atol=TOL)
        assert torch.all(got.transpose(1, 2)[~batch.attention_mask.bool()] == 0)  # padding scores exactly zero


def test_bfloat16_products_round_only_the_two_products_and_stay_close():
    """``product_dtype=bfloat16``: low-rank token scores within bfloat16's rounding of the float32 ones.

    Not equal (the inputs are rounded), close (relative 1e-2 of the largest score), and float64 references
    ignore the setting.
    """
    engine, factors = fitted("llama", ProjectionSpec(0), 3)
    queries = engine.query_gradients(batches_of(random_queries(3), 3, TINY_PAD), factors, ["a", "b", "c"])
    batch = collate(random_sequences(4, seed=13), pad_id=TINY_PAD)
    assert InfluenceEngine(engine.model, replace(engine.config, product_dtype="bfloat16")).products is None
    captured, _ = engine.capture_batch(batch, projected=True)
    q32 = queries.to("cpu", torch.float32)
    for name, c in captured.items():
        c32 = Captured(c.a.float(), c.g.float(), c.mask)
        plain = q32.token_scores(name, c32)
        rounded = q32.token_scores(name, c32, torch.bfloat16)
        assert rounded.dtype == torch.float32 and not torch.equal(rounded, plain)
        scale = plain.abs().max()
        torch.testing.assert_close(rounded, plain, rtol=0, atol=1e-2 * float(scale))
        torch.testing.assert_close(q32.layer_scores(name, c32, "token", torch.bfloat16), rounded.sum(-1))
        # The sequence path keeps float32 (rounding the summed G is not measured on a real model).
        sequence = q32.layer_scores(name, c32, "sequence", torch.bfloat16)
        assert torch.equal(sequence, q32.layer_scores(name, c32, "sequence"))
    with pytest.raises(ValueError, match="product_dtype"):
        InfluenceConfig(product_dtype="float16")


@pytest.fixture
def bfloat16_units(monkeypatch):
    """The bfloat16 product paths on any CPU (numerically the same; fast only with AMX, which CI may lack)."""
    monkeypatch.setattr("pipeline.core.influence.fast_bfloat16", lambda device: True)


def test_fast_bfloat16_on_cpu_means_amx():
    """AVX512-BF16 alone multiplied slower than float32 on a real model (docs/figures.md): only AMX counts."""
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    assert fast_bfloat16(torch.device("cpu")) == amx
    engine = InfluenceEngine(tiny_model("llama", dtype=torch.float32),
                             InfluenceConfig(query_rank=2, product_dtype="bfloat16", fit_product_dtype="bfloat16"))
    assert engine.products == (torch.bfloat16 if amx else None)
    assert engine.fit_products == (torch.bfloat16 if amx else None)


def test_low_rank_queries_are_kept_in_the_products_dtype_at_the_same_token_scores(bfloat16_units):
    """With bfloat16 products the low-rank factors are kept (and stored) in bfloat16: half the memory, and the
    token path's scores bit for bit those of the same factors kept in float32 (it rounds them anyway)."""
    config = InfluenceConfig(precision="float32", query_rank=3, product_dtype="bfloat16", empirical_fisher=True)
    engine = InfluenceEngine(tiny_model("llama", dtype=torch.float32), config)
    factors = engine.fit(batches_of(random_sequences(8, seed=11), 4, TINY_PAD))
    queries = engine.query_gradients(batches_of(random_queries(3), 3, TINY_PAD), factors, ["a", "b", "c"])
    assert engine.query_factors_dtype == torch.bfloat16
    assert {t.dtype for t in (*queries.left.values(), *queries.right.values())} == {torch.bfloat16}
    assert all(t.dtype == torch.bfloat16 for t in queries.to_tensors().values())  # so is the file
    plain = InfluenceEngine(engine.model, replace(config, product_dtype="float32"))
    assert plain.query_factors_dtype == torch.float32 and plain.query_bytes(3) == 2 * engine.query_bytes(3)
    widened = queries.to("cpu", torch.float32)
    captured, _ = engine.capture_batch(collate(random_sequences(4, seed=13), pad_id=TINY_PAD), projected=True)
    for name, c in captured.items():
        assert torch.equal(queries.layer_scores(name, c, "token", torch.bfloat16),
                           widened.layer_scores(name, c, "token", torch.bfloat16))
        # the sequence path multiplies the (rounded) factors in float32
        assert torch.equal(queries.layer_scores(name, c, "sequence"), widened.layer_scores(name, c, "sequence"))


def test_int8_products_quantise_both_products_and_stay_close():
    """``products=torch.int8``: token scores within int8's quantisation of the float32 ones, padding exactly zero.

    Not equal, close (relative 3e-2 of the largest score per layer), the int32 sums exact: the same scores as
    float64 products of the dequantised vectors and factors.
    """
    engine, factors = fitted("llama", ProjectionSpec(0), 3)
    queries = engine.query_gradients(batches_of(random_queries(3), 3, TINY_PAD), factors, ["a", "b", "c"])
    batch = collate(random_sequences(4, seed=13), pad_id=TINY_PAD)
    captured, _ = engine.capture_batch(batch, projected=True)
    q32 = queries.to("cpu", torch.float32)
    pad = ~batch.attention_mask.bool()
    assert pad.any()
    for name, c in captured.items():
        c32 = Captured(c.a.float(), c.g.float(), c.mask)
        plain = q32.token_scores(name, c32)
        quantised = q32.token_scores(name, c32, torch.int8)
        assert quantised.dtype == torch.float32 and not torch.equal(quantised, plain)
        torch.testing.assert_close(quantised, plain, rtol=0, atol=3e-2 * float(plain.abs().max()))
        assert torch.all(quantised.transpose(1, 2)[pad] == 0)
        torch.testing.assert_close(q32.layer_scores(name, c32, "token", torch.int8), quantised.sum(-1))
        # The same numbers in float64 from the dequantised inputs: the only error is the quantisation.
        g8, g_scale = queries_module._quantise(c32.g.reshape(-1, c32.g.shape[-1]).double(), dim=1)
        a8, a_scale = queries_module._quantise(c32.a.reshape(-1, c32.a.shape[-1]).double(), dim=1)
        left8, right8, scales = q32.quantised(name)
        l_scale = q32.flat("left", name, torch.float32).abs().amax(0).double() / 127
        by_column = (g8.double() * g_scale) @ (left8.double() * l_scale)
        by_column *= (a8.double() * a_scale) @ (right8.double() * (scales.double() / l_scale))
        want = by_column.view(*c32.g.shape[:2], 3, -1).sum(-1).transpose(1, 2)
        torch.testing.assert_close(quantised.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        # A non-finite vector gives non-finite scores (the worker leaves such windows out), never a quantised zero.
        g = c32.g.clone()
        g[0, 1, 0], g[1, 2, 0] = float("inf"), float("nan")
        poisoned = q32.token_scores(name, Captured(c32.a, g, c32.mask), torch.int8)
        assert not poisoned[0, :, 1].isfinite().any() and not poisoned[1, :, 2].isfinite().any()
        assert poisoned[2:].isfinite().all()


def test_int8_products_are_for_scoring_only_and_need_fast_int8(monkeypatch):
    """int8 scores (VNNI CPUs) but never fits; its query factors are kept in bfloat16, float64 ignores it."""
    with pytest.raises(ValueError, match="factors.product_dtype"):
        InfluenceConfig(fit_product_dtype="int8")
    scoring = AttributeConfig()
    scoring.score.product_dtype = "int8"
    scoring.validate()
    fitting = AttributeConfig()
    fitting.factors.product_dtype = "int8"
    with pytest.raises(ConfigError, match="factors.product_dtype must be one of"):
        fitting.validate()
    vnni = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    assert fast_int8(torch.device("cpu")) == vnni
    model = tiny_model("llama", dtype=torch.float32)
    engine = InfluenceEngine(model, InfluenceConfig(query_rank=2, product_dtype="int8"))
    assert engine.products == (torch.int8 if vnni else None)
    monkeypatch.setattr("pipeline.core.influence.fast_int8", lambda device: True)
    monkeypatch.setattr("pipeline.core.influence.fast_bfloat16", lambda device: False)
    engine = InfluenceEngine(model, InfluenceConfig(query_rank=2, product_dtype="int8"))
    assert engine.products == torch.int8 and engine.query_factors_dtype == torch.bfloat16
    assert engine.range_products is None  # no fast bfloat16: the range finder stays in float32
    assert InfluenceEngine(model, InfluenceConfig(query_rank=2, product_dtype="int8", precision="float64")).products \
        is None


def test_bfloat16_fit_products_stay_close_to_the_float32_fit(bfloat16_units):
    """``fit_product_dtype=bfloat16``: covariances and Lambda within bfloat16's rounding of the float32 fit."""
    model = tiny_model("llama")
    config = InfluenceConfig(empirical_fisher=True)
    train = batches_of(random_sequences(8, seed=15), 4, TINY_PAD)
    plain, rounded = InfluenceEngine(model, config), InfluenceEngine(model, replace(config, fit_product_dtype="bfloat16"))
    assert rounded.fit_products == torch.bfloat16 and plain.fit_products is None
    cov32, cov16 = plain.covariance_sums(train), rounded.covariance_sums(train)
    bases = eigendecompose(cov32)
    lam32, lam16 = plain.lambda_sums(train, bases), rounded.lambda_sums(train, bases)
    for name in plain.layers:
        for x32, x16 in [(cov32.a_sum[name], cov16.a_sum[name]), (cov32.s_sum[name], cov16.s_sum[name]),
                         (lam32.sums[name], lam16.sums[name])]:
            assert not torch.equal(x32, x16)
            torch.testing.assert_close(x16, x32, rtol=0, atol=2e-2 * float(x32.abs().max()))
    reference = InfluenceEngine(model, replace(config, fit_product_dtype="bfloat16", precision="float64"))
    assert reference.fit_products is None


def test_a_shards_sums_accumulate_in_the_engines_dtype():
    """float32 engines keep a shard's sums in float32 (half the memory), within float32 rounding of float64's."""
    model = tiny_model("llama")
    config = InfluenceConfig(empirical_fisher=True)
    train = batches_of(random_sequences(12, seed=17), 2, TINY_PAD)  # 6 batches
    plain, reference = InfluenceEngine(model, config), InfluenceEngine(model, replace(config, precision="float64"))
    cov32 = plain.covariance_sums(train)
    cov64 = CovarianceSums.zeros(plain.space_dims(False), dtype=torch.float64)
    for batch in train:  # the same float32 products, accumulated in float64
        captured, _ = plain.capture_batch(batch, False, "data")
        cov64.update(captured, batch.attention_mask)
    bases = eigendecompose(cov64)
    lam32 = plain.lambda_sums(train, bases)
    assert reference.covariance_sums(train[:1]).a_sum[next(iter(plain.layers))].dtype == torch.float64
    for name in plain.layers:
        for x32, x64 in [(cov32.a_sum[name], cov64.a_sum[name]), (cov32.s_sum[name], cov64.s_sum[name])]:
            assert x32.dtype == torch.float32
            torch.testing.assert_close(x32.double(), x64, rtol=0, atol=1e-6 * float(x64.abs().max()))
        assert lam32.sums[name].dtype == torch.float32
    tensors = cov32.to_tensors(torch.float32)
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k != "::num_tokens")


def test_float32_eigendecompositions_give_orthonormal_bases_and_the_float64_scores():
    """``eigh_dtype=float32``: bases orthonormal and diagonalising to float32's rounding; scores as float64's."""
    model = tiny_model("llama")
    config = InfluenceConfig(empirical_fisher=True, damping=1e-3)
    train = batches_of(random_sequences(8, seed=16), 4, TINY_PAD)
    plain, rounded = InfluenceEngine(model, config), InfluenceEngine(model, replace(config, eigh_dtype="float32"))
    assert (plain.eigh_dtype, rounded.eigh_dtype) == (torch.float64, torch.float32)
    cov = plain.covariance_sums(train)
    b64, b32 = eigendecompose(cov), eigendecompose(cov, torch.float32)
    for name in plain.layers:
        for q, total, lam in [(b32.q_a[name], cov.a_sum[name], b64.l_a[name]),
                              (b32.q_s[name], cov.s_sum[name], b64.l_s[name])]:
            assert q.dtype == torch.float32
            q = q.double()
            eye = torch.eye(q.shape[0], dtype=torch.float64)
            torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-5)
            rotated = q.T @ (total.double() / cov.num_tokens) @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert float(off.abs().max()) < 1e-5 * float(lam.abs().max())
            torch.testing.assert_close(torch.diagonal(rotated).sort().values, lam, rtol=0,
                                       atol=1e-5 * float(lam.abs().max()))
    queries = batches_of(random_queries(3), 3, TINY_PAD)
    f64, f32 = plain.fit(train), rounded.fit(train)
    assert next(iter(f32.q_a.values())).dtype == torch.float32
    want = torch.cat([plain.score_batch(b, plain.query_gradients(queries, f64, ["a", "b", "c"])) for b in train])
    got = torch.cat([plain.score_batch(b, plain.query_gradients(queries, f32, ["a", "b", "c"])) for b in train])
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * float(want.abs().max()))
    reference = InfluenceEngine(model, replace(config, eigh_dtype="float32", precision="float64"))
    assert reference.eigh_dtype == torch.float64
    with pytest.raises(ValueError, match="eigh_dtype"):
        InfluenceConfig(eigh_dtype="bfloat16")


@pytest.mark.parametrize("rank", [0, 4])
def test_query_memory_is_checked_before_anything_is_formed(rank, monkeypatch):
    engine, factors = fitted("gpt2", ProjectionSpec(0), rank)
    queries = random_queries(3)
    need = engine.query_bytes(len(queries))
    per_layer = {n: s.d_out * s.d_in for n, s in engine.layers.items()}
    low_rank_size = sum(4 * (s.d_out + s.d_in) for s in engine.layers.values())
    expected = 3 * 8 * (sum(per_layer.values()) if rank == 0 else low_rank_size)
    assert need == expected
    engine.config = replace(engine.config, max_query_bytes=need - 1)

    def no_capture(*args, **kwargs):
        raise AssertionError("query gradients were captured before the memory check")

    monkeypatch.setattr(engine, "capture_batch", no_capture)
    with pytest.raises(QueryMemoryError, match=r"score\.query_rank") as err:
        engine.query_gradients(batches_of(queries, 3, TINY_PAD), factors, [s.doc_id for s in queries])
    assert "max_query_bytes" in str(err.value)
    if rank == 0:
        assert "set score.query_rank=" in str(err.value)
    with pytest.raises(ValueError, match="max_query_bytes"):
        InfluenceConfig(max_query_bytes=0)


# ---- lambda_sample: the Lambda pass on a subset of the fitting shards --------------------------


def run_context(lambda_sample: float, num_shards: int = 10, max_documents: int = 0, docs=None) -> RunContext:
    """A run over ``num_shards`` shards of ``docs[i]`` documents each (1 when not given)."""
    cfg = AttributeConfig()
    cfg.factors.lambda_sample = lambda_sample
    cfg.factors.lambda_max_documents = max_documents
    docs = docs or [1] * num_shards
    starts = [sum(docs[:i]) for i in range(len(docs))]
    shards = [Shard(i, f"s{i:03d}", "file://x", "jsonl", starts[i], starts[i] + docs[i]) for i in range(len(docs))]
    return RunContext(cfg=cfg, storage=None, shards=shards, corpus_fp="c", queries=[], queries_fp="q", model_fp="m")


def test_lambda_sample_one_keeps_every_shard_and_the_factors_id():
    ctx = run_context(1.0)
    assert ctx.lambda_shards == ctx.fit_shards
    before = FactorsKey.of(ctx.cfg.influence(), "m", ctx.cfg.corpus.window, [s.shard_id for s in ctx.fit_shards])
    assert "lambda_shards" not in ctx.factors_key.to_json()
    assert ctx.factors_id == before.id


def test_lambda_sample_is_a_deterministic_subset_that_enters_the_factors_id():
    half = run_context(0.5)
    ids = [s.shard_id for s in half.lambda_shards]
    assert len(ids) == 5 and ids == [s.shard_id for s in run_context(0.5).lambda_shards]
    assert ids[0] == "s000" and ids[-1] == "s009"  # evenly spread over the fitting shards
    assert half.factors_id != run_context(1.0).factors_id
    assert FactorsKey.from_json(half.factors_key.to_json()) == half.factors_key
    assert len(run_context(0.01).lambda_shards) == 1
    with pytest.raises(ConfigError, match="factors.lambda_sample"):
        run_context(0.0).lambda_shards


def test_lambda_max_documents_caps_the_lambda_shards_by_their_documents():
    """The fewest evenly spread shards holding the cap's documents; no cap, or a cap above the corpus, keeps all."""
    docs = [30, 10, 40, 20, 50, 10, 30, 40, 20, 50]  # 300 documents in 10 shards
    assert run_context(1.0, max_documents=0, docs=docs).lambda_shards == run_context(1.0, docs=docs).fit_shards
    whole = run_context(1.0, max_documents=300, docs=docs)
    assert whole.lambda_shards == whole.fit_shards
    assert whole.factors_id == run_context(1.0, docs=docs).factors_id
    for cap in (1, 45, 90, 150, 299):
        ctx = run_context(1.0, max_documents=cap, docs=docs)
        picked = ctx.lambda_shards
        held = sum(s.num_docs for s in picked)
        assert held >= cap, (cap, held)
        assert picked == spread(ctx.fit_shards, len(picked))  # evenly spread
        if len(picked) > 1:  # one shard fewer, evenly spread, would not hold the cap
            assert sum(s.num_docs for s in spread(ctx.fit_shards, len(picked) - 1)) < cap, (cap, len(picked))
        # a subset enters the factors id; all ten (299 of 300 documents) is the uncapped fit
        assert ("lambda_shards" in ctx.factors_key.to_json()) == (len(picked) < len(docs)), cap
    # the smaller of the two subsets when lambda_sample is set as well
    assert len(run_context(0.2, max_documents=250, docs=docs).lambda_shards) == 2
    assert len(run_context(0.9, max_documents=45, docs=docs).lambda_shards) < 9
    with pytest.raises(ConfigError, match="factors.lambda_max_documents"):
        lambda_subset(run_context(1.0).fit_shards, 1.0, -1)
    bad = AttributeConfig()
    bad.factors.lambda_max_documents = -5
    with pytest.raises(ConfigError, match="factors.lambda_max_documents"):
        bad.validate()


def test_lambda_max_documents_enters_the_pin_settings_only_when_set():
    """Pins made before the cap existed keep their settings id; a cap makes another setting."""
    key = run_context(1.0).fresh_factors_key
    assert settings_id(key, 0, 1.0) == settings_id(key, 0, 1.0, 0)
    assert settings_id(key, 0, 1.0, 64) != settings_id(key, 0, 1.0)


def test_max_documents_caps_the_fitting_sample_in_hash_order():
    """Both passes fit on the fewest shards, in hash order of their ids, holding the cap's documents."""
    docs = [30, 10, 40, 20, 50, 10, 30, 40, 20, 50]  # 300 documents in 10 shards

    def capped(max_documents: int, sample_shards: int = 0) -> RunContext:
        ctx = run_context(1.0, docs=docs)
        ctx.cfg.factors.max_documents, ctx.cfg.factors.sample_shards = max_documents, sample_shards
        return ctx

    def rank(shard: Shard) -> bytes:
        return hashlib.sha256(shard.shard_id.encode()).digest()

    uncapped = run_context(1.0, docs=docs)
    for cap in (0, 300, 1000):
        assert capped(cap).sample_shards == uncapped.shards
        assert capped(cap).factors_id == uncapped.factors_id
    for cap in (1, 45, 150, 299):
        ctx = capped(cap)
        picked = ctx.sample_shards
        held = sum(s.num_docs for s in picked)
        assert held >= cap and picked == [s for s in ctx.shards if s in picked], cap  # listing order
        last = max(picked, key=rank)
        assert held - last.num_docs < cap, cap  # the fewest, in hash order
        assert all(rank(s) > rank(last) for s in ctx.shards if s not in picked), cap
        assert ctx.lambda_shards == picked  # Lambda on the same sample (lambda_sample=1)
        assert ctx.factors_key.shards == tuple(s.shard_id for s in picked)
        assert (ctx.factors_id != uncapped.factors_id) == (len(picked) < len(docs)), cap  # 299: all ten
    assert len(capped(290, sample_shards=3).sample_shards) == 3  # the smaller of the two samples
    assert capped(10, sample_shards=3).sample_shards == capped(10).sample_shards
    with pytest.raises(ConfigError, match="factors.max_documents"):
        hash_sample(uncapped.shards, 0, -1)
    bad = AttributeConfig()
    bad.factors.max_documents = -5
    with pytest.raises(ConfigError, match="factors.max_documents"):
        bad.validate()
    key = uncapped.fresh_factors_key
    assert settings_id(key, 0, 1.0, 0, 0) == settings_id(key, 0, 1.0)  # pins made before the key stay
    # The pin records the cap only where it binds: the default cap on a smaller corpus leaves pins as they were.
    assert AttributeConfig().factors.max_documents == 100_000 and uncapped.binding_max_documents == 0
    assert capped(45).binding_max_documents == 45 and capped(299).binding_max_documents == 0
    assert capped(10, sample_shards=3).binding_max_documents == 10 and capped(290, 3).binding_max_documents == 0
    assert settings_id(key, 0, 1.0, 0, 100) != settings_id(key, 0, 1.0)


def test_partial_sums_add_in_place_as_they_add():
    """The driver folds shard partials with ``+=`` (one sum alive): the same numbers as ``+``, bit for bit."""
    engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64", empirical_fisher=True))
    parts = [engine.covariance_sums(batches_of(random_sequences(4, seed=s), 2, TINY_PAD)) for s in (21, 22, 23)]
    expected = parts[0] + parts[1] + parts[2]
    bases = eigendecompose(expected)
    lams = [engine.lambda_sums(batches_of(random_sequences(4, seed=s), 2, TINY_PAD), bases) for s in (21, 22)]
    lam_expected = lams[0] + lams[1]
    folded, lam = parts[0], lams[0]
    folded += parts[1]
    folded += parts[2]
    lam += lams[1]
    assert folded.num_tokens == expected.num_tokens and lam.num_sequences == 8
    for name in engine.layers:
        assert torch.equal(folded.a_sum[name], expected.a_sum[name])
        assert torch.equal(folded.s_sum[name], expected.s_sum[name])
        assert torch.equal(lam.sums[name], lam_expected.sums[name])


def test_lambda_on_fewer_batches_is_the_core_view_of_lambda_sample():
    """In the core a sample is just fewer batches; all of them gives the one-go fit."""
    engine = InfluenceEngine(tiny_model("neox"), InfluenceConfig(precision="float64", empirical_fisher=True))
    train = batches_of(random_sequences(8, seed=14), 2, TINY_PAD)
    bases = eigendecompose(engine.covariance_sums(train))
    full = engine.fit(train)
    every = engine.lambda_sums(train, bases)
    part = engine.lambda_sums(train[::2], bases)
    assert part.num_sequences == 4 and every.num_sequences == 8
    for name in engine.layers:
        torch.testing.assert_close(every.sums[name] / 8, full.lambdas[name], rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "bfloat16, int8, want",
    [(True, True, torch.bfloat16), (False, True, torch.int8), (False, False, None), (True, False, torch.bfloat16)],
)
def test_auto_products_take_the_fastest_the_device_has(monkeypatch, bfloat16, int8, want):
    """``auto`` (the job's default): bfloat16 where fast, else int8 where fast, else float32; never at float64."""
    monkeypatch.setattr("pipeline.core.influence.fast_bfloat16", lambda device: bfloat16)
    monkeypatch.setattr("pipeline.core.influence.fast_int8", lambda device: int8)
    assert AttributeConfig().score.product_dtype == "auto"
    model = tiny_model("llama", dtype=torch.float32)
    engine = InfluenceEngine(model, InfluenceConfig(query_rank=2, product_dtype="auto"))
    assert engine.products == want and engine.products_name == str(want or torch.float32).removeprefix("torch.")
    assert engine.range_products == (torch.bfloat16 if want is not None and bfloat16 else None)
    assert engine.query_factors_dtype == (torch.float32 if want is None else torch.bfloat16)
    assert InfluenceEngine(model, InfluenceConfig(query_rank=2, product_dtype="auto", precision="float64")).products \
        is None
