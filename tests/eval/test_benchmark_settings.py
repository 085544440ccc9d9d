"""The benchmark job's setting keys (projection_dim, projection_mode, query_rank) and the smollm2 preset's config."""

from __future__ import annotations

import pytest
import torch

from benchmarks.speed.config import PRESETS, BenchmarkConfig
from pipeline.config import AttributeConfig
from pipeline.errors import ConfigError


def test_null_settings_follow_the_attribution_defaults():
    cfg = BenchmarkConfig()
    a = AttributeConfig()
    influence = cfg.influence()
    assert influence.projection.dim == a.projection.dim and influence.projection.mode == a.projection.mode
    assert influence.query_rank == a.score.query_rank
    assert influence.damping == a.factors.damping and influence.empirical_fisher == a.factors.empirical_fisher


def test_settings_override_every_run_of_ours(tmp_path):
    from benchmarks.speed.inputs import BenchInputs
    from benchmarks.speed.versus_kronfluence import attribute_config

    cfg = BenchmarkConfig(projection_dim=0, projection_mode="sketch", query_rank=16)
    assert cfg.projection().dim == 0 and cfg.projection().mode == "sketch"
    assert cfg.influence().query_rank == 16 and cfg.influence(32).projection.dim == 32
    inputs = BenchInputs("model", "corpus.parquet", [], {5: "q.jsonl"}, None, None)
    a = attribute_config(cfg, inputs, 5, str(tmp_path), "r", None, 1, torch.device("cpu"))
    assert (a.projection.dim, a.projection.mode, a.score.query_rank) == (0, "sketch", 16)
    a = attribute_config(cfg, inputs, 5, str(tmp_path), "r", 64, 1, torch.device("cpu"))
    assert a.projection.dim == 64 and a.score.query_rank == 16
    assert a.factors.empirical_fisher == AttributeConfig().factors.empirical_fisher  # null: the default
    flipped = BenchmarkConfig(empirical_fisher=not AttributeConfig().factors.empirical_fisher)
    assert flipped.influence().empirical_fisher == flipped.empirical_fisher
    a = attribute_config(flipped, inputs, 5, str(tmp_path), "r", None, 1, torch.device("cpu"))
    assert a.factors.empirical_fisher == flipped.empirical_fisher
    assert a.factors.max_documents == AttributeConfig().factors.max_documents  # null: the default
    capped = BenchmarkConfig(max_documents=500, lambda_max_documents=100)
    a = attribute_config(capped, inputs, 5, str(tmp_path), "r", None, 1, torch.device("cpu"))
    assert (a.factors.max_documents, a.factors.lambda_max_documents) == (500, 100)


@pytest.mark.parametrize("override, message", [
    ({"projection_mode": "random"}, "projection_mode"),
    ({"projection_dim": -1}, "projection_dim"),
    ({"query_rank": -2}, "query_rank"),
    ({"lambda_max_documents": -1}, "lambda_max_documents"),
    ({"max_documents": -1}, "max_documents must"),
    ({"corpus_text": "wiki"}, "corpus_text"),
    ({"kronfluence_corpus_order": False, "kronfluence_longest_first": False}, "kronfluence_corpus_order"),
])
def test_setting_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        BenchmarkConfig(**override).validate()


def test_smollm2_is_a_preset():
    assert "smollm2" in PRESETS
    BenchmarkConfig(model=BenchmarkConfig().model.__class__(preset="smollm2")).validate()


def test_the_ceiling_keeps_one_warm_copy_and_computes_every_weights_gradient():
    from benchmarks.speed.inputs import Ceiling
    from pipeline.core.text import batches_of
    from tests.helpers import TINY_PAD, random_sequences, tiny_model

    model = tiny_model("llama")
    batches = batches_of(random_sequences(4), 2, TINY_PAD)
    ceiling = Ceiling(model, torch.device("cpu"))
    assert ceiling.model is not model  # a copy: the caller's model is not touched
    forwards = []
    ceiling.model.register_forward_hook(lambda *_: forwards.append(1))
    assert ceiling.seconds(batches) > 0
    assert len(forwards) == 2 * len(batches)  # the first measurement runs one untimed pass before
    ceiling.seconds(batches)
    assert len(forwards) == 3 * len(batches)  # later ones only the timed pass, on the same warm copy
    assert all(p.grad is not None for p in ceiling.model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_fit_sample_check_scores_every_fit_in_one_pass_as_each_alone():
    """benchmarks.evaluate.fit_sample_check puts the fits' queries side by side: same scores as one fit at a time."""
    from benchmarks.evaluate.fit_sample_check import every, scores_with
    from pipeline.core.ekfac import EKFACFactors, eigendecompose
    from pipeline.core.influence import InfluenceConfig, InfluenceEngine
    from pipeline.core.text import batches_of
    from tests.helpers import TINY_PAD, random_queries, random_sequences, tiny_model

    model = tiny_model("llama")
    batches = batches_of(random_sequences(16), 4, TINY_PAD)
    queries = batches_of(random_queries(3), 4, TINY_PAD)
    engine = InfluenceEngine(model, InfluenceConfig(modules=AttributeConfig().model.modules, damping=1e-3,
                                                    empirical_fisher=True, query_rank=2))
    bases = eigendecompose(engine.covariance_sums(batches))
    fits = {share: EKFACFactors.from_parts(engine.factors_meta(), bases,
                                           engine.lambda_sums(every(batches, share), bases))
            for share in (1.0, 0.5)}
    ids = ["q0", "q1", "q2"]
    together = scores_with(engine, fits, batches, queries, ids)
    for share, factors in fits.items():
        alone = scores_with(engine, {share: factors}, batches, queries, ids)[share]
        assert together[share].shape == (16, 3)
        # float32 products: side by side they differ from alone only by the matmul's rounding, which on some CPUs
        # changes with the number of query columns (2e-8 of the largest score measured on an AMD EPYC).
        assert abs(together[share] - alone).max() <= 1e-6 * abs(alone).max()
    assert abs(together[1.0] - together[0.5]).max() > 1e-3 * abs(together[1.0]).max()  # the fits do differ


def test_pydoc_paragraphs_are_distinct_and_enough_for_the_benchmark_corpus():
    from benchmarks.speed.inputs import pydoc_paragraphs

    paragraphs = pydoc_paragraphs()
    assert len(paragraphs) == len(set(paragraphs)) >= 512
    assert min(len(p.split()) for p in paragraphs) >= 16 and all("\n" not in p for p in paragraphs)
