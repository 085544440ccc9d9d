"""The numeric core against autograd loops, identities and invariances (float64)."""

from __future__ import annotations

import copy
import io
import json
import mmap
import re

import pytest
import torch

from pipeline.core.ekfac import EKFACFactors, FactorMismatchError, eigendecompose, per_sequence_gradients
from pipeline.core.forward import sequence_losses
from pipeline.core.influence import InfluenceConfig, InfluenceEngine, NonFiniteGradientError
from pipeline.core.projection import ProjectionSpec, Projector, projection_matrix
from pipeline.core.serialization import tensors_to_bytes
from pipeline.core.text import batches_of, collate
from pipeline.core.tracking import NoTrackedModulesError, find_tracked_layers, weight_gradient
from tests.helpers import TINY_PAD, random_queries, random_sequences, tiny_model

FAMILIES = ["gpt2", "llama", "neox"]  # Conv1D with bias; Linear without bias; Linear with bias
TOL = 1e-10  # float64 throughout


def autograd_gradient(model, seq, layers):
    """Full per-sequence gradient of the summed NLL, one sequence alone, via .backward()."""
    model = copy.deepcopy(model).requires_grad_(True)
    model.zero_grad()
    sequence_losses(model, collate([seq], pad_id=1)).sum().backward()
    modules = dict(model.named_modules())
    return {n: weight_gradient(modules[n], spec) for n, spec in layers.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dim", [0, 6])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_projected_per_sequence_gradients_equal_autograd_loop(family, dim, padding_side):
    model = tiny_model(family)
    engine = InfluenceEngine(copy.deepcopy(model), InfluenceConfig(projection=ProjectionSpec(dim), precision="float64"))
    seqs = random_sequences(5, seed=1)
    captured, _ = engine.capture_batch(collate(seqs, pad_id=1, padding_side=padding_side), projected=True)
    has_bias = any(s.has_bias for s in engine.layers.values())
    assert has_bias == (family != "llama")
    for i, seq in enumerate(seqs):
        full = autograd_gradient(model, seq, engine.layers)
        for name in engine.layers:
            expected = full[name]
            if engine.projector is not None:
                expected = engine.projector.project_matrix(name, expected)
            got = per_sequence_gradients(captured[name])[i]
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)


def test_projection_is_deterministic_and_unbiased():
    a = projection_matrix(3, "layer.x", "in", 64, 10)
    b = projection_matrix(3, "layer.x", "in", 64, 10)
    assert torch.equal(a, b)
    assert not torch.equal(a, projection_matrix(3, "layer.y", "in", 64, 10))
    assert not torch.equal(a, projection_matrix(4, "layer.x", "in", 64, 10))
    # E[P^T P] = I: the mean over many draws converges to the identity.
    mean = sum(projection_matrix(s, "l", "in", 8, 5).T @ projection_matrix(s, "l", "in", 8, 5) for s in range(2000)) / 2000
    torch.testing.assert_close(mean, torch.eye(5, dtype=torch.float64), atol=0.08, rtol=0)


def _scores(engine, train, queries, factors=None, batch_size=4, padding_side="right"):
    factors = factors or engine.fit(batches_of(train, batch_size, TINY_PAD, padding_side))
    q = engine.query_gradients(batches_of(queries, batch_size, TINY_PAD, padding_side), factors,
                               [s.doc_id for s in queries])
    return torch.cat([engine.score_batch(b, q) for b in batches_of(train, batch_size, TINY_PAD, padding_side)]), factors


@pytest.mark.parametrize("mode", ["sketch", "curvature"])
def test_scores_do_not_depend_on_batch_size_or_padding_side(mode):
    train, queries = random_sequences(12, seed=2), random_queries(3)
    cfg = InfluenceConfig(projection=ProjectionSpec(6, mode=mode), precision="float64", empirical_fisher=True)
    ref, _ = _scores(InfluenceEngine(tiny_model("gpt2"), cfg), train, queries, batch_size=12)
    for bs, side in [(1, "right"), (5, "left"), (4, "right")]:
        got, _ = _scores(InfluenceEngine(tiny_model("gpt2"), cfg), train, queries, batch_size=bs, padding_side=side)
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_fitting_in_shards_then_summing_equals_fitting_in_one_go():
    train = random_sequences(12, seed=3)
    engine = InfluenceEngine(tiny_model("neox"), InfluenceConfig(precision="float64", empirical_fisher=True))
    one_go = engine.fit(batches_of(train, 4, TINY_PAD))
    shards = [batches_of(train[:5], 2, TINY_PAD), batches_of(train[5:], 3, TINY_PAD)]
    cov = sum((engine.covariance_sums(s) for s in shards[1:]), engine.covariance_sums(shards[0]))
    bases = eigendecompose(cov)
    lam = sum((engine.lambda_sums(s, bases) for s in shards[1:]), engine.lambda_sums(shards[0], bases))
    split = EKFACFactors.from_parts(engine.factors_meta(), bases, lam)
    assert split.meta.num_sequences == one_go.meta.num_sequences == 12
    for name in engine.layers:
        torch.testing.assert_close(split.lambdas[name], one_go.lambdas[name], rtol=1e-9, atol=1e-14)


def test_sampled_fisher_sums_do_not_depend_on_batching_or_units():
    """True-Fisher labels are drawn per window (`label_uniforms`), so the same windows give the same
    sums batched in any size and order, split into units added on the driver or summed ``into`` one."""
    train = random_sequences(12, seed=3)
    engine = InfluenceEngine(tiny_model("neox"), InfluenceConfig(precision="float64", seed=7))  # sampled Fisher
    one_go = engine.covariance_sums(batches_of(train, 4, TINY_PAD))
    shuffled = [train[i] for i in (5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6)]
    units = [batches_of(shuffled[:5], 2, TINY_PAD), batches_of(shuffled[5:], 3, TINY_PAD)]
    separate = engine.covariance_sums(units[0]) + engine.covariance_sums(units[1])
    first = engine.covariance_sums(units[0])
    into = engine.covariance_sums(units[1], into=first)
    assert into is first and into.num_tokens == separate.num_tokens == one_go.num_tokens
    other_seed = InfluenceEngine(tiny_model("neox"), InfluenceConfig(precision="float64", seed=8))
    name = next(iter(engine.layers))
    assert not torch.allclose(other_seed.covariance_sums(batches_of(train, 4, TINY_PAD)).s_sum[name],
                              one_go.s_sum[name])  # the seed matters: other labels, other sums
    bases = eigendecompose(one_go)
    lam_one_go = engine.lambda_sums(batches_of(train, 4, TINY_PAD), bases)
    lam_separate = engine.lambda_sums(units[0], bases) + engine.lambda_sums(units[1], bases)
    lam_into = engine.lambda_sums(units[1], bases, into=engine.lambda_sums(units[0], bases))
    assert lam_into.num_sequences == lam_separate.num_sequences == 12
    for name in engine.layers:
        for sums in (separate, into):
            torch.testing.assert_close(sums.a_sum[name], one_go.a_sum[name], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(sums.s_sum[name], one_go.s_sum[name], rtol=1e-12, atol=1e-14)
        for lam in (lam_separate, lam_into):
            torch.testing.assert_close(lam.sums[name], lam_one_go.sums[name], rtol=1e-12, atol=1e-14)


def test_sampled_fisher_is_seeded_and_differs_from_empirical():
    train = random_sequences(8, seed=4)
    cfg = InfluenceConfig(precision="float64", seed=7)
    a = InfluenceEngine(tiny_model("gpt2"), cfg).fit(batches_of(train, 4, TINY_PAD))
    b = InfluenceEngine(tiny_model("gpt2"), cfg).fit(batches_of(train, 4, TINY_PAD))
    emp = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64", empirical_fisher=True))
    emp = emp.fit(batches_of(train, 4, TINY_PAD))
    name = next(iter(a.lambdas))
    assert torch.equal(a.lambdas[name], b.lambdas[name])
    assert not torch.allclose(a.lambdas[name], emp.lambdas[name])
    assert a.meta.fisher == "sampled" and emp.meta.fisher == "empirical"


@pytest.mark.parametrize("projection", [ProjectionSpec(0), ProjectionSpec(6, mode="sketch"), ProjectionSpec(6, mode="curvature")])
@pytest.mark.parametrize("rank", [0, 2])
def test_token_and_layer_scores_sum_to_sequence_scores(projection, rank):
    train, queries = random_sequences(6, seed=5), random_queries(3)
    engine = InfluenceEngine(tiny_model("llama"), InfluenceConfig(projection=projection, precision="float64", query_rank=rank))
    factors = engine.fit(batches_of(train, 3, TINY_PAD))
    q = engine.query_gradients(batches_of(queries, 3, TINY_PAD), factors, [s.doc_id for s in queries])
    batch = collate(train, pad_id=1)
    total, per_layer = engine.score_batch(batch, q, per_layer=True)
    tokens = engine.token_scores(batch, q)  # (B, Q, L, T)
    torch.testing.assert_close(per_layer.sum(-1), total, rtol=TOL, atol=TOL)
    torch.testing.assert_close(tokens.sum(-1), per_layer, rtol=TOL, atol=TOL)
    assert (tokens[batch.attention_mask.unsqueeze(1).unsqueeze(1).expand_as(tokens) == 0] == 0).all()


@pytest.mark.parametrize("rank", [0, 2])
def test_the_one_pass_breakdown_equals_scores_and_token_scores(rank):
    """``score_breakdown`` (the worker's pass with low-rank queries) agrees with ``score_batch`` and ``token_scores``."""
    train, queries = random_sequences(6, seed=7), random_queries(3)
    engine = InfluenceEngine(tiny_model("llama"), InfluenceConfig(precision="float64", query_rank=rank))
    factors = engine.fit(batches_of(train, 3, TINY_PAD))
    q = engine.query_gradients(batches_of(queries, 3, TINY_PAD), factors, [s.doc_id for s in queries])
    batch = collate(train, pad_id=1)
    total, per_layer, per_token = engine.score_breakdown(batch, q)
    want_total, want_layers = engine.score_batch(batch, q, per_layer=True)
    want_tokens = engine.token_scores(batch, q)  # (B, Q, L, T)
    torch.testing.assert_close(total, want_total, rtol=TOL, atol=TOL)
    torch.testing.assert_close(per_layer, want_layers, rtol=TOL, atol=TOL)
    torch.testing.assert_close(per_token, want_tokens.sum(2), rtol=TOL, atol=TOL)


def test_projection_off_is_plain_ekfac_written_out():
    """``dim=0`` scores equal <Q_S[(Q_S^T Gq Q_A)/(L+lam)]Q_A^T, Gn> from full autograd gradients."""
    model = tiny_model("gpt2")
    train, queries = random_sequences(6, seed=6), random_queries(2)
    engine = InfluenceEngine(copy.deepcopy(model), InfluenceConfig(precision="float64", empirical_fisher=True, damping=0.01))
    scores, factors = _scores(engine, train, queries)
    for qi, qs in enumerate(queries):
        gq = autograd_gradient(model, qs, engine.layers)
        for ni, ns in enumerate(train):
            gn = autograd_gradient(model, ns, engine.layers)
            expected = 0.0
            for name in engine.layers:
                qa, qs_, lam = factors.q_a[name], factors.q_s[name], factors.lambdas[name]
                pre = qs_ @ ((qs_.T @ gq[name] @ qa) / (lam + 0.01)) @ qa.T
                expected += float((pre * gn[name]).sum())
            assert scores[ni, qi].item() == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_low_rank_queries_at_full_rank_equal_dense():
    train, queries = random_sequences(6, seed=7), random_queries(2)
    dense, factors = _scores(InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64")), train, queries)
    engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64", query_rank=64))
    low, _ = _scores(engine, train, queries, factors=factors)
    torch.testing.assert_close(low, dense, rtol=1e-8, atol=1e-12)


def test_heuristic_damping_is_a_tenth_of_mean_lambda():
    engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64"))
    factors = engine.fit(batches_of(random_sequences(4), 4, TINY_PAD))
    name = next(iter(factors.lambdas))
    assert factors.damping(name, None) == pytest.approx(0.1 * factors.lambdas[name].mean().item())
    assert factors.damping(name, 0.5) == 0.5


# ---- bad input ---------------------------------------------------------------------------------


def test_no_tracked_modules_names_the_pattern_and_candidates():
    with pytest.raises(NoTrackedModulesError, match=r"model.modules='.*nothing.*'.*c_fc"):
        find_tracked_layers(tiny_model("gpt2"), r".*nothing.*")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_tracked_layers(tiny_model("gpt2"), r"(")


def test_factors_from_another_model_or_module_set_are_rejected():
    train = random_sequences(4)
    engine = InfluenceEngine(tiny_model("gpt2", seed=0), InfluenceConfig(precision="float64"))
    factors = engine.fit(batches_of(train, 4, TINY_PAD))
    other = InfluenceEngine(tiny_model("gpt2", seed=1), InfluenceConfig(precision="float64"))
    with pytest.raises(FactorMismatchError, match="fitted for model"):
        other.query_gradients(batches_of(random_queries(1), 1, TINY_PAD), factors, ["q0"])
    subset = InfluenceEngine(tiny_model("gpt2", seed=0), InfluenceConfig(modules=r".*\.h\.0\.mlp\..*", precision="float64"))
    with pytest.raises(FactorMismatchError, match="model.modules"):
        subset.check_factors(factors)
    curvature = InfluenceEngine(
        tiny_model("gpt2", seed=0), InfluenceConfig(projection=ProjectionSpec(4, mode="curvature"), precision="float64")
    )
    with pytest.raises(FactorMismatchError, match="space"):
        curvature.check_factors(factors)


def test_factors_round_trip_through_safetensors_bytes():
    engine = InfluenceEngine(tiny_model("neox"), InfluenceConfig(precision="float64"))
    factors = engine.fit(batches_of(random_sequences(4), 4, TINY_PAD))
    back = EKFACFactors.from_bytes(factors.to_bytes())
    assert back.meta.to_json() == factors.meta.to_json()
    for name in factors.lambdas:
        assert torch.equal(back.lambdas[name], factors.lambdas[name])
        assert torch.equal(back.q_a[name], factors.q_a[name])
    engine.check_factors(back)


def test_factors_read_layer_by_layer_equal_the_parsed_file_and_give_the_same_queries(tmp_path):
    """``from_buffer`` (a memory map here): each layer's tensors as ``from_bytes`` gives them (bases cast where
    asked), one layer kept at a time, the same preconditioned queries; a file that is not whole is refused."""
    engine = InfluenceEngine(tiny_model("llama"), InfluenceConfig(empirical_fisher=True, query_rank=2))
    factors = engine.fit(batches_of(random_sequences(4), 4, TINY_PAD))
    path = tmp_path / "factors.safetensors"
    path.write_bytes(factors.to_bytes())
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    eager = EKFACFactors.from_bytes(bytes(data))
    lazy = EKFACFactors.from_buffer(data)
    cast = EKFACFactors.from_buffer(data, torch.float64, torch.float64)
    assert lazy.meta.to_json() == eager.meta.to_json() and list(lazy.q_a) == list(eager.q_a)
    assert set(lazy.q_a) == set(engine.layers)
    for name in engine.layers:
        for mine, want in ((lazy.q_a, eager.q_a), (lazy.q_s, eager.q_s), (lazy.lambdas, eager.lambdas)):
            assert mine[name].dtype == want[name].dtype and torch.equal(mine[name], want[name])
            assert mine[name] is mine[name]  # the latest layer is kept: asking again copies nothing
        assert cast.q_s[name].dtype == cast.lambdas[name].dtype == torch.float64
        assert torch.equal(cast.q_s[name], eager.q_s[name].double())
    first = next(iter(engine.layers))
    held = lazy.q_a[first]
    assert lazy.q_a[list(engine.layers)[1]] is not held and lazy.q_a[first] is not held  # only the latest is kept
    with pytest.raises(KeyError):
        lazy.q_a["no.such.layer"]
    queries, ids = batches_of(random_queries(3), 3, TINY_PAD), ["a", "b", "c"]
    want = engine.query_gradients(queries, eager, ids)
    got = engine.query_gradients(queries, lazy, ids)
    for name in engine.layers:
        assert torch.equal(got.left[name], want.left[name]) and torch.equal(got.right[name], want.right[name])
    with pytest.raises(ValueError, match="run past the end"):
        EKFACFactors.from_buffer(data[: len(data) - 8])
    other = tensors_to_bytes({"x": torch.zeros(2)})
    with pytest.raises(FactorMismatchError, match="not a factors file"):
        EKFACFactors.from_buffer(other)
    missing = {k: v for k, v in factors.to_tensors().items() if k != f"{first}::Lambda"}
    with pytest.raises(FactorMismatchError, match=f"Lambda.*{re.escape(first)}"):
        EKFACFactors.from_buffer(tensors_to_bytes(missing, {"meta": json.dumps(factors.meta.to_json())}))


def test_factors_written_layer_by_layer_are_the_bytes_of_the_parts_read_whole():
    """``write_factors`` (the driver's assembly) from the groups' bases files and the units' Lambda files: the very
    bytes ``from_parts(...).to_bytes()`` gives on the same parts read whole, sums added in float64 in order."""
    from pipeline.core.ekfac import Eigenbases, LambdaSums, layer_groups, partial_sums_dtype, write_factors
    from pipeline.core.serialization import SafetensorsView, tensors_from_bytes

    engine = InfluenceEngine(tiny_model("llama"), InfluenceConfig(empirical_fisher=True))
    train = batches_of(random_sequences(6), 2, TINY_PAD)
    whole = eigendecompose(engine.covariance_sums(train), torch.float32)
    groups = layer_groups(engine.space_dims(False), 3)
    assert len(groups) == 3
    group_files = [tensors_to_bytes(Eigenbases({n: whole.q_a[n] for n in g}, {}, {n: whole.q_s[n] for n in g}, {},
                                               whole.num_tokens).to_tensors()) for g in groups]
    unit_files = [tensors_to_bytes(engine.lambda_sums(part, whole).to_tensors(torch.float32))
                  for part in (train[:1], train[1:])]
    bases = None
    for data in group_files:
        group = Eigenbases.from_tensors(tensors_from_bytes(data)[0])
        bases = group if bases is None else (bases.update(group) or bases)
    sums = None
    for data in unit_files:
        part = LambdaSums.from_tensors(tensors_from_bytes(data, partial_sums_dtype)[0])
        sums = part if sums is None else sums.__iadd__(part)
    want = EKFACFactors.from_parts(engine.factors_meta(), bases, sums).to_bytes()
    out = io.BytesIO()
    meta = engine.factors_meta()
    counts = write_factors(out, meta, [SafetensorsView(d) for d in group_files], [SafetensorsView(d) for d in unit_files])
    assert out.getvalue() == bytes(want)
    assert counts == (meta.num_tokens, meta.num_sequences) == (whole.num_tokens, 6)
    # Lambda stored in float32 (what the driver writes for a float32 engine): the float64 means rounded, the
    # same bases, the same damping to float32 rounding, and so the same preconditioned queries.
    small = io.BytesIO()
    write_factors(small, engine.factors_meta(), [SafetensorsView(d) for d in group_files],
                  [SafetensorsView(d) for d in unit_files], torch.float32)
    exact, rounded = EKFACFactors.from_bytes(bytes(want)), EKFACFactors.from_bytes(small.getvalue())
    assert len(small.getvalue()) < len(want)
    for n in exact.lambdas:
        assert rounded.lambdas[n].dtype == torch.float32 and exact.lambdas[n].dtype == torch.float64
        assert torch.equal(rounded.lambdas[n], exact.lambdas[n].float())
        assert torch.equal(rounded.q_a[n], exact.q_a[n]) and torch.equal(rounded.q_s[n], exact.q_s[n])
        assert rounded.damping(n, None) == pytest.approx(exact.damping(n, None), rel=1e-7)
    queries = batches_of(random_sequences(2, seed=5), 2, TINY_PAD)
    got = engine.query_gradients(queries, rounded, ["a", "b"]).dense
    ref = engine.query_gradients(queries, exact, ["a", "b"]).dense
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-6 * float(ref[n].abs().max()))
    with pytest.raises(ValueError, match="zero sequences"):
        write_factors(io.BytesIO(), engine.factors_meta(), [SafetensorsView(d) for d in group_files],
                      [SafetensorsView(tensors_to_bytes(LambdaSums.zeros(engine.space_dims(False)).to_tensors()))])
    with pytest.raises(FactorMismatchError, match="lack layers"):
        write_factors(io.BytesIO(), engine.factors_meta(), [SafetensorsView(d) for d in group_files[1:]],
                      [SafetensorsView(d) for d in unit_files])


@pytest.mark.parametrize("query_rank", [0, 2])
def test_non_finite_weights_give_a_named_error_for_queries(query_rank):
    model = tiny_model("gpt2")
    engine = InfluenceEngine(model, InfluenceConfig(precision="float64", query_rank=query_rank))
    factors = engine.fit(batches_of(random_sequences(4), 4, TINY_PAD))
    with torch.no_grad():
        model.transformer.wte.weight[5:].fill_(float("nan"))
    engine._fingerprint = factors.meta.model_fingerprint  # same model object, weights now broken
    with pytest.raises(NonFiniteGradientError, match="queries"):
        engine.query_gradients(batches_of(random_queries(2), 2, TINY_PAD), factors, ["q0", "q1"])


def test_projector_skips_sides_already_small():
    layers = find_tracked_layers(tiny_model("gpt2"))
    proj = Projector(ProjectionSpec(32), layers)
    name = "transformer.h.0.mlp.c_fc"  # d_in = 16 + bias, d_out = 64
    assert proj.p_in[name] is None and proj.p_out[name].shape == (32, 64)


def test_safetensors_writer_is_read_back_by_the_library(tmp_path):
    """Our writer's bytes are what the ``safetensors`` library reads: every tensor, dtype, shape and the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    from pipeline.core.serialization import tensors_to_bytes

    gen = torch.Generator().manual_seed(4)
    tensors = {"b::S_sum": torch.randn(7, 7, generator=gen, dtype=torch.float64), "a": torch.randn(3, generator=gen),
               "ids": torch.arange(5, dtype=torch.int32), "flags": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "odd": torch.arange(3, dtype=torch.uint8),
               "half": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
               "view": torch.randn(4, 6, generator=gen)[:, ::2]}  # not contiguous: written as its values
    data = tensors_to_bytes(tensors, {"meta": '{"x": 1}'})
    back = load(bytes(data))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"meta": '{"x": 1}'} and set(f.keys()) == set(tensors)
    assert bytes(tensors_to_bytes({"a": tensors["a"]})) == save({"a": tensors["a"]})  # the reference's own layout
    with pytest.raises(TypeError, match="'k': 1"):
        tensors_to_bytes(tensors, {"k": 1})


def test_safetensors_cast_while_parsing_equals_load_then_cast():
    from pipeline.core.serialization import tensors_from_bytes, tensors_to_bytes

    gen = torch.Generator().manual_seed(3)
    tensors = {"a::Q_A": torch.randn(5, 5, generator=gen, dtype=torch.float64),
               "a::Lambda": torch.rand(3, 5, generator=gen, dtype=torch.float64),
               "ids": torch.arange(7), "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
               "half": torch.randn(2, 3, generator=gen).to(torch.bfloat16)}
    data = tensors_to_bytes(tensors, {"k": "v"})
    plain, meta = tensors_from_bytes(data)
    cast, meta_cast = tensors_from_bytes(data, lambda n: torch.float32 if n.endswith("::Q_A") else None)
    assert meta == meta_cast == {"k": "v"} and set(cast) == set(tensors)
    assert cast["a::Q_A"].dtype == torch.float32 and torch.equal(cast["a::Q_A"], plain["a::Q_A"].float())
    for name in tensors.keys() - {"a::Q_A"}:
        assert cast[name].dtype == tensors[name].dtype and torch.equal(cast[name], tensors[name]), name
    cast["ids"][0] = 99  # an own copy, not a view of the (immutable) bytes
    assert tensors_from_bytes(data, lambda n: None)[0]["ids"][0] == 0
    engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64"))
    fitted = engine.fit(batches_of(random_sequences(4), 4, TINY_PAD))
    back = EKFACFactors.from_bytes(fitted.to_bytes(), torch.float32)
    want = fitted.with_bases_in(torch.float32)
    for name in fitted.lambdas:
        assert torch.equal(back.q_s[name], want.q_s[name]) and torch.equal(back.q_a[name], want.q_a[name])
        assert back.lambdas[name].dtype == torch.float64 and torch.equal(back.lambdas[name], fitted.lambdas[name])
