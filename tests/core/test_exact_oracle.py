"""Exact oracle for EK-FAC influence (docs/design.md#how-it-is-checked).

Case A, exact by construction: EK-FAC's curvature
``(Q_S x Q_A) diag(Lambda) (Q_S x Q_A)^T`` *is* the empirical Fisher
``F = (1/N) sum_n vec(G_n) vec(G_n)^T`` whenever ``F`` is diagonal in the
Kronecker eigenbasis, because ``Lambda`` is then exactly ``diag`` of ``F`` in
that basis. That holds when every sequence's gradient ``G_n`` is a multiple of
one basis matrix ``u_i v_j^T`` (``u_i`` an eigenvector of ``S``, ``v_j`` one of
``A``). We build that (a) through the real engine, with a small causal model
whose tracked layer sees inputs along the columns of a rotation ``U_A`` and
receives output gradients along the columns of a rotation ``U_S``, and (b) on
the core functions directly with hand-made ``Captured`` vectors. Both must
match a dense solve ``(F + lambda I)^-1`` to ~1e-10 in float64.

Case B, generic: on a tiny trained GPT-2 small enough to form the empirical
Fisher of its tracked layers from autograd per-sequence gradients, EK-FAC
is an approximation; its rank agreement with exact influence (full Fisher and
block-diagonal, per-layer Fisher) is a quality figure, asserted against
conservative floors, and EK-FAC must rank closer to exact influence than the
plain gradient dot product does.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.ekfac import (
    CovarianceSums,
    EKFACFactors,
    FactorsMeta,
    LambdaSums,
    eigendecompose,
    per_sequence_gradients,
)
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import IGNORE, TokenWindow, batches_of, collate
from pipeline.core.tracking import Captured, LayerSpec, find_tracked_layers, weight_gradient
from pipeline.tiny_lm import new_gpt2
from tests.helpers import spearman, train_full_batch

# Case A: relative error allowed between EK-FAC and the exact damped inverse
# when EK-FAC is exact by construction (float64). Measured 2e-12 (engine) and
# 8e-13 (core functions) at damping 1e-3, where the dense solve's conditioning
# dominates; ~1e-14 at damping 0.1 and with the heuristic damping.
EXACT_REL_TOL = 1e-10
# Case B: Spearman floors per damping are in GPT2_FLOORS, next to the measured values.


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def random_rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def exact_scores(train_grads: torch.Tensor, query_grads: torch.Tensor, damping: torch.Tensor | float) -> torch.Tensor:
    """``vec(G_q)^T (F + D)^-1 vec(G_n)``, ``(Q, N)``; ``F = (1/N) sum_n vec(G_n) vec(G_n)^T``.

    ``train_grads``: ``(N, P)``; ``query_grads``: ``(Q, P)``; ``damping``: scalar or ``(P,)``.
    """
    n, p = train_grads.shape
    fisher = train_grads.T @ train_grads / n
    damped = fisher + torch.diag(torch.as_tensor(damping, dtype=fisher.dtype).expand(p))
    return torch.linalg.solve(damped, query_grads.T).T @ train_grads.T


def min_relative_gap(eigenvalues: torch.Tensor) -> float:
    ev = torch.sort(eigenvalues).values
    return float((ev[1:] - ev[:-1]).min() / ev.abs().max())


# ---- Case A (a): through the engine ---------------------------------------------------------


class GatedLM(nn.Module):
    """A causal LM (position-wise, so trivially causal) built so that EK-FAC is exact.

    Token ``x`` embeds to ``a = s(x) U_A[:, j(x)]``; the tracked layer
    ``block.mlp.fc`` (no bias) maps it to ``h``; only the coordinate ``i(x)`` of
    ``U_S^T h`` reaches the logits, so ``dL/dh = c U_S[:, i(x)]`` for a scalar
    ``c``. Hence ``G = sum_t g_t a_t^T`` is a multiple of ``U_S e_i e_j^T U_A^T``
    whenever a sequence's labelled positions all hold the same token.
    """

    D_IN, D_OUT = 4, 3
    VOCAB = 12  # x -> (x % 3, x % 4) hits every (i, j) pair once (CRT)

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.u_a = random_rotation(self.D_IN, gen)
        u_s = random_rotation(self.D_OUT, gen)
        tokens = torch.arange(self.VOCAB)
        scale = 0.5 + torch.rand(self.VOCAB, generator=gen, dtype=f64)
        self.embed = nn.Embedding(self.VOCAB, self.D_IN, dtype=f64)
        with torch.no_grad():
            self.embed.weight.copy_(scale[:, None] * self.u_a[:, tokens % self.D_IN].T)
        self.block = nn.Module()
        self.block.mlp = nn.Module()
        self.block.mlp.fc = nn.Linear(self.D_IN, self.D_OUT, bias=False, dtype=f64)
        with torch.no_grad():
            self.block.mlp.fc.weight.copy_(torch.randn(self.D_OUT, self.D_IN, generator=gen, dtype=f64))
        self.register_buffer("u_s", u_s)
        self.register_buffer("gate", F.one_hot(tokens % self.D_OUT, self.D_OUT).to(f64))
        self.register_buffer("w_out", 2 * torch.randn(self.VOCAB, generator=gen, dtype=f64))
        self.register_buffer("b_out", torch.randn(self.VOCAB, generator=gen, dtype=f64))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        h = self.block.mlp.fc(self.embed(input_ids))  # (B, T, d_out)
        z = (h @ self.u_s * self.gate[input_ids]).sum(-1, keepdim=True)  # coordinate i(x) of U_S^T h
        return types.SimpleNamespace(logits=z * self.w_out + self.b_out)


def _gated_data():
    """Training sequences ``(x, y)`` and ``(x, x, y)`` (same token at both labelled inputs)."""
    gen = torch.Generator().manual_seed(1)
    # Skewed token frequencies keep the eigenvalues of A and S well separated.
    weights = torch.tensor([1.0, 2, 4, 7, 11, 16, 3, 5, 9, 13, 6, 20], dtype=torch.float64)
    train = []
    for n in range(60):
        x = int(torch.multinomial(weights, 1, generator=gen))
        y = int(torch.randint(0, GatedLM.VOCAB, (1,), generator=gen))
        ids = (x, y) if n % 3 else (x, x, y)
        train.append(TokenWindow(f"t{n}", 0, ids, ids))
    queries = []
    for q in range(5):
        ids = tuple(int(t) for t in torch.randint(0, GatedLM.VOCAB, (5,), generator=gen))
        labels = (IGNORE, IGNORE) + ids[2:]  # dense in the eigenbasis: several (i, j) pairs
        queries.append(TokenWindow(f"q{q}", 0, ids, labels))
    return train, queries


def _autograd_grads(model: nn.Module, seqs: list[TokenWindow], modules: dict[str, nn.Module], specs) -> torch.Tensor:
    """Per-sequence gradients of the summed NLL, flattened over the tracked layers: ``(N, P)``."""
    rows = []
    for seq in seqs:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq.input_ids])
        labels = torch.tensor(seq.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1]
        F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").backward()
        rows.append(torch.cat([weight_gradient(modules[n], specs[n]).flatten() for n in specs]))
    return torch.stack(rows).to(torch.float64)


def _engine_scores(model, train, queries, damping, modules_pattern, batch_size=4):
    """Our EK-FAC scores ``(Q, N)`` (projection off, empirical Fisher, float64), the engine and factors."""
    config = InfluenceConfig(
        modules=modules_pattern, projection=ProjectionSpec(0), precision="float64", empirical_fisher=True,
        damping=damping,
    )
    engine = InfluenceEngine(copy.deepcopy(model), config)

    factors = engine.fit(batches_of(train, batch_size, 0))
    q = engine.query_gradients(batches_of(queries, batch_size, 0), factors, [s.doc_id for s in queries])
    scores = torch.cat([engine.score_batch(b, q) for b in batches_of(train, batch_size, 0)], 0).T
    return scores, engine, factors


@pytest.mark.parametrize("damping", [1e-3, 1e-1, None])
def test_ekfac_is_exact_when_fisher_is_diagonal_in_kronecker_basis_engine(damping):
    model = GatedLM()
    train, queries = _gated_data()
    ours, engine, factors = _engine_scores(model, train, queries, damping, r"block\.mlp\.fc")

    oracle = copy.deepcopy(model)
    specs = find_tracked_layers(oracle, r"block\.mlp\.fc")
    modules = dict(oracle.named_modules())
    oracle.requires_grad_(False)
    modules["block.mlp.fc"].weight.requires_grad_(True)
    g_train = _autograd_grads(oracle, train, modules, specs)
    g_query = _autograd_grads(oracle, queries, modules, specs)

    # The construction really makes F diagonal in the fitted Kronecker eigenbasis, with distinct
    # eigenvalues of A and S (otherwise the eigenbasis would not be unique).
    name = "block.mlp.fc"
    q_a, q_s = factors.q_a[name], factors.q_s[name]
    fisher = g_train.T @ g_train / len(train)
    basis = torch.kron(q_s, q_a)  # vec is row-major over (d_out, d_in)
    rotated = basis.T @ fisher @ basis
    off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
    assert off_diagonal.abs().max() < 1e-12 * rotated.abs().max()
    bases = eigendecompose(engine.covariance_sums([collate(train, 0)]))
    assert min_relative_gap(bases.l_a[name]) > 1e-2 and min_relative_gap(bases.l_s[name]) > 1e-2
    # Lambda is then exactly the spectrum of F.
    spectrum = torch.diagonal(rotated)
    assert torch.allclose(factors.lambdas[name].flatten(), spectrum, rtol=1e-10, atol=1e-12 * float(spectrum.max()))

    # The heuristic damping 0.1 * mean(Lambda) is 0.1 * trace(F) / P exactly.
    lam = damping if damping is not None else 0.1 * float(torch.trace(fisher)) / fisher.shape[0]
    exact = exact_scores(g_train, g_query, lam)
    err = rel_err(ours, exact)
    print(f"exact case via engine, damping={damping}: rel. error vs dense solve = {err:.2e}")
    assert err < EXACT_REL_TOL

    # Plain K-FAC eigenvalues l_S x l_A are not proportional to F's spectrum here, so it is the
    # eigenvalue correction that makes EK-FAC exact: the test has teeth.
    kfac = torch.outer(bases.l_s[name], bases.l_a[name]).flatten()
    assert rel_err(kfac / kfac.norm(), spectrum / spectrum.norm()) > 1e-1


# ---- Case A (b): the core functions directly ------------------------------------------------


def test_ekfac_is_exact_on_core_functions():
    """``Captured`` vectors aligned with rotated Kronecker bases, fed through the map-reduce."""
    gen = torch.Generator().manual_seed(7)
    f64 = torch.float64
    d_in, d_out, tokens, n_seq = 5, 4, 6, 48
    u_a, u_s = random_rotation(d_in, gen), random_rotation(d_out, gen)
    # Per sequence one (i, j) pair shared by all its tokens, with random per-token scales and
    # trailing padding. Per-direction scales 1, 2, 3, ... keep the eigenvalues of A and S apart.
    i_n = torch.arange(n_seq) % d_out
    j_n = torch.randperm(n_seq, generator=gen) % d_in
    lengths = torch.randint(1, tokens + 1, (n_seq,), generator=gen)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(f64)
    jitter = lambda: 0.9 + 0.2 * torch.rand(n_seq, tokens, generator=gen, dtype=f64)  # noqa: E731
    s_a = (1.0 + j_n[:, None]) * jitter() * mask
    sign = torch.where(torch.rand(n_seq, tokens, generator=gen) < 0.3, -1.0, 1.0).to(f64)
    s_g = (1.0 + i_n[:, None]) * jitter() * sign * mask
    a = s_a[..., None] * u_a[:, j_n].T[:, None, :]  # (N, T, d_in)
    g = s_g[..., None] * u_s[:, i_n].T[:, None, :]  # (N, T, d_out)
    name = "block.mlp.fc"
    dims = {name: (d_out, d_in)}

    # Two "shards" whose partial sums add up (as the distributed fit does).
    halves = [slice(0, 20), slice(20, n_seq)]
    cov = [CovarianceSums.zeros(dims) for _ in halves]
    for part, sl in zip(cov, halves):
        part.update({name: Captured(a[sl], g[sl])}, mask[sl])
    bases = eigendecompose(cov[0] + cov[1])
    assert bases.num_tokens == int(mask.sum())
    assert min_relative_gap(bases.l_a[name]) > 1e-2 and min_relative_gap(bases.l_s[name]) > 1e-2
    lam_parts = [LambdaSums.zeros(dims) for _ in halves]
    for part, sl in zip(lam_parts, halves):
        part.update({name: Captured(a[sl], g[sl])}, bases, a[sl].shape[0])
    spec = LayerSpec(name, d_in, d_out, has_bias=False, transposed=False)
    meta = FactorsMeta("fingerprint", name, {name: spec}, "empirical")
    factors = EKFACFactors.from_parts(meta, bases, lam_parts[0] + lam_parts[1])
    assert factors.meta.num_sequences == n_seq

    grads = per_sequence_gradients(Captured(a, g)).flatten(1)  # (N, P), row-major (d_out, d_in)
    fisher = grads.T @ grads / n_seq
    queries = torch.randn(3, d_out, d_in, generator=gen, dtype=f64)  # dense, not aligned with the basis
    for damping in (1e-3, 1e-1, None):
        lam = damping if damping is not None else 0.1 * float(torch.trace(fisher)) / fisher.shape[0]
        exact = torch.linalg.solve(fisher + lam * torch.eye(d_in * d_out, dtype=f64), queries.flatten(1).T).T
        ours = factors.precondition(name, queries, damping).flatten(1)
        err = rel_err(ours, exact)
        print(f"exact case on core functions, damping={damping}: rel. error = {err:.2e}")
        assert err < EXACT_REL_TOL


# ---- Case B: a generic tiny GPT-2 -----------------------------------------------------------

GPT2_VOCAB = 32


def _gpt2_data(n_train: int = 48, n_queries: int = 6):
    gen = torch.Generator().manual_seed(3)

    def progression(length):
        start = int(torch.randint(0, GPT2_VOCAB - 1, (1,), generator=gen))
        step = int(torch.randint(1, 4, (1,), generator=gen))
        return [1 + (start + k * step) % (GPT2_VOCAB - 1) for k in range(length)]

    train = []
    for n in range(n_train):
        ids = tuple(progression(int(torch.randint(4, 13, (1,), generator=gen))))
        train.append(TokenWindow(f"t{n}", 0, ids, ids))
    queries = []
    for q in range(n_queries):
        prompt = int(torch.randint(2, 6, (1,), generator=gen))
        ids = progression(prompt + 3)
        queries.append(TokenWindow(f"q{q}", 0, tuple(ids), tuple([IGNORE] * prompt + ids[prompt:])))
    return train, queries


def _tiny_gpt2(train: list[TokenWindow]) -> nn.Module:
    model = new_gpt2(GPT2_VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=32, eos_id=1, pad_id=0, seed=0)
    model.set_attn_implementation("eager")
    return train_full_batch(model, train, 0, steps=60)


@pytest.fixture(scope="module")
def gpt2_case():
    train, queries = _gpt2_data()
    model = _tiny_gpt2(train)
    pattern = r".*\.mlp\..*"
    oracle = copy.deepcopy(model)
    specs = find_tracked_layers(oracle, pattern)
    modules = dict(oracle.named_modules())
    oracle.requires_grad_(False)
    for n, spec in specs.items():
        modules[n].weight.requires_grad_(True)
        if spec.has_bias:
            modules[n].bias.requires_grad_(True)
    g_train = _autograd_grads(oracle, train, modules, specs)
    g_query = _autograd_grads(oracle, queries, modules, specs)
    sizes = [s.d_out * s.d_in for s in specs.values()]
    return model, train, queries, pattern, specs, sizes, g_train, g_query


def _exact_variants(g_train, g_query, sizes, layer_damping: list[float]):
    """Exact influence with the full Fisher and with the block-diagonal (per-layer) Fisher."""
    damping = torch.cat([torch.full((s,), d, dtype=torch.float64) for s, d in zip(sizes, layer_damping)])
    full = exact_scores(g_train, g_query, damping)
    block = sum(
        exact_scores(gt, gq, d)
        for gt, gq, d in zip(g_train.split(sizes, 1), g_query.split(sizes, 1), layer_damping)
    )
    return full, block


# Measured Spearman correlations over all 6 x 48 (query, train) pairs (float64,
# 48 training sequences, MLP layers of both blocks = 1104 parameters):
#
#   damping        EK-FAC vs exact full | vs exact block-diag | grad-dot vs full | vs block
#   1e-3                0.239           |        0.272        |      0.178       |  0.167
#   0.1*mean(L)         0.258           |        0.348        |      0.199       |  0.284
#   1e-1                0.368           |        0.593        |      0.314       |  0.510
#
# The exact Fisher here has only 37 of its 1104 eigenvalues above 1e-3 of the
# largest (48 sequences), so with small damping its inverse is dominated by
# directions EK-FAC models least well; agreement rises with damping (0.63 vs the
# full Fisher at damping 1.0). EK-FAC equals the exact per-layer Fisher with its
# off-diagonal part in the Kronecker eigenbasis dropped (asserted to 1e-10
# below); that diagonal carries only ~56-59% of each layer's Fisher (Frobenius),
# so the gap is a property of the approximation, not of the implementation
# (which matches kronfluence to ~1e-14, tests/core/test_reference_kronfluence.py).
# Floors: about half the measured values; the checks with teeth are the
# orderings (EK-FAC beats the identity-curvature gradient dot product, and is
# closer to the block-diagonal exact Fisher, its own structure, than to the full).
GPT2_FLOORS = {  # damping -> (min Spearman vs full, min Spearman vs block-diagonal)
    1e-3: (0.12, 0.14),
    None: (0.13, 0.17),
    1e-1: (0.18, 0.30),
}


@pytest.mark.parametrize("damping", list(GPT2_FLOORS))
def test_gpt2_ekfac_vs_exact_fisher(gpt2_case, damping):
    """Rank agreement of EK-FAC with exact influence on a tiny GPT-2 (see GPT2_FLOORS)."""
    model, train, queries, pattern, specs, sizes, g_train, g_query = gpt2_case
    assert sum(sizes) <= 3000
    ours, engine, factors = _engine_scores(model, train, queries, damping, pattern, batch_size=8)
    layer_damping = [factors.damping(n, damping) for n in specs]
    full, block = _exact_variants(g_train, g_query, sizes, layer_damping)

    # Structure: EK-FAC is exactly the per-layer exact Fisher with everything off the
    # diagonal in its Kronecker eigenbasis dropped. Rebuild it densely from the autograd
    # gradients and compare: this pins the gap below on the approximation itself.
    dense_ekfac = torch.zeros_like(ours)
    diag_mass = []
    for name, gt, gq, lam in zip(specs, g_train.split(sizes, 1), g_query.split(sizes, 1), layer_damping):
        basis = torch.kron(factors.q_s[name], factors.q_a[name])
        rotated = basis.T @ (gt.T @ gt / len(train)) @ basis
        spectrum = torch.diagonal(rotated)
        assert torch.allclose(factors.lambdas[name].flatten(), spectrum, rtol=1e-8, atol=1e-12 * float(spectrum.max()))
        diag_mass.append(float(spectrum.norm() / rotated.norm()))
        dense_ekfac += ((gq @ basis) / (spectrum + lam)) @ (gt @ basis).T
    assert rel_err(ours, dense_ekfac) < EXACT_REL_TOL

    dot = g_query @ g_train.T  # identity curvature
    rho_full, rho_block = spearman(ours, full), spearman(ours, block)
    rho_dot_full, rho_dot_block = spearman(dot, full), spearman(dot, block)
    print(
        f"gpt2 damping={damping} ({sum(sizes)} tracked params, {len(train)} seqs, {len(queries)} queries): "
        f"Spearman EK-FAC vs exact full Fisher = {rho_full:.4f}, vs exact block-diagonal = {rho_block:.4f}; "
        f"grad-dot vs full = {rho_dot_full:.4f}, vs block = {rho_dot_block:.4f}; "
        f"full vs block = {spearman(full, block):.4f}; "
        f"share of F (Frobenius) on the Kronecker-eigenbasis diagonal per layer = {[round(m, 3) for m in diag_mass]}"
    )
    floor_full, floor_block = GPT2_FLOORS[damping]
    assert rho_full > floor_full
    assert rho_block > floor_block
    assert rho_full > rho_dot_full
    assert rho_block > rho_dot_block
    assert rho_block > rho_full
