"""CUDA paths of the core: same scores as the CPU float64 reference; bf16 autocast close in rank.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu tests/core/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec, Projector
from pipeline.core.text import collate
from tests.helpers import random_queries, random_sequences, spearman, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _scores(family, precision, device, projection):
    model = tiny_model(family, dtype=torch.float32)
    # Empirical Fisher: sampled labels come from a different RNG stream on each device.
    config = InfluenceConfig(projection=projection, precision=precision, damping=1e-3, empirical_fisher=True)
    engine = InfluenceEngine(model, config, device)
    train, queries = random_sequences(16, seed=11), random_queries(4, seed=12)
    batches = [collate(train[i : i + 8], pad_id=1) for i in range(0, 16, 8)]
    factors = engine.fit(batches)
    q = engine.query_gradients([collate(queries, pad_id=1)], factors, [s.doc_id for s in queries])
    return torch.cat([engine.score_batch(b, q) for b in batches]).double().cpu()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [ProjectionSpec(0), ProjectionSpec(8, mode="sketch"), ProjectionSpec(8, mode="curvature")])
def test_cuda_float32_matches_cpu_float64(family, projection):
    ref = _scores(family, "float64", "cpu", projection)
    got = _scores(family, "float32", "cuda", projection)
    rel = float((got - ref).norm() / ref.norm())
    print(f"{family} {projection}: relative error CUDA fp32 vs CPU fp64 = {rel:.2e}")
    # float32 lands near 1e-6 on the CPU; 1e-3 leaves room for cuBLAS's order of summation.
    assert rel < 1e-3


def test_bf16_autocast_agrees_in_rank():
    ref = _scores("gpt2", "float32", "cuda", ProjectionSpec(8))
    bf16 = _scores("gpt2", "bf16", "cuda", ProjectionSpec(8))
    rho = spearman(ref, bf16)
    print(f"bf16 autocast vs fp32: Spearman {rho:.4f}")
    assert torch.isfinite(bf16).all() and rho > 0.9


def test_projection_matrices_identical_on_cpu_and_cuda():
    layers = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig()).layers
    cpu = Projector(ProjectionSpec(8), layers, "cpu")
    gpu = Projector(ProjectionSpec(8), layers, "cuda")
    for name in layers:
        assert torch.equal(cpu.p_out[name], gpu.p_out[name].cpu())



def test_factors_read_layer_by_layer_are_held_on_the_device_once():
    """``from_buffer(..., device=cuda)``: each layer is moved to the GPU when read, so ``bases`` (asked twice
    per layer while preconditioning) copies nothing more, and the queries equal those of CPU factors."""
    from pipeline.core.ekfac import EKFACFactors
    from pipeline.core.text import batches_of
    from tests.helpers import TINY_PAD

    cpu = InfluenceEngine(tiny_model("llama", dtype=torch.float32), InfluenceConfig())
    factors = cpu.fit(batches_of(random_sequences(6), 3, TINY_PAD))
    data = factors.to_bytes()
    gpu = InfluenceEngine(tiny_model("llama", dtype=torch.float32), InfluenceConfig(), device="cuda")
    lazy = EKFACFactors.from_buffer(data, gpu.dtype, device=gpu.device)
    name = next(iter(lazy.q_a))
    like = torch.zeros(1, device=gpu.device)
    q_s, q_a = lazy.bases(name, like)
    assert q_a.is_cuda and q_a is lazy.q_a[name] and lazy.bases(name, like)[1] is q_a
    queries = batches_of(random_sequences(2, seed=3), 2, TINY_PAD)
    got = gpu.query_gradients(queries, lazy, ["a", "b"]).dense
    want = cpu.query_gradients(queries, EKFACFactors.from_buffer(data, cpu.dtype), ["a", "b"]).dense
    for n in want:
        torch.testing.assert_close(got[n].cpu(), want[n], rtol=1e-3, atol=1e-4 * float(want[n].abs().max()))
