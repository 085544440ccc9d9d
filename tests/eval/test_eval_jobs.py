"""The evaluation and benchmark jobs on tiny settings, and the pieces they are built from.

Default tier: the shared-capture scorer against ``InfluenceEngine``, the
baselines' identities, every shipped config composed, and one smoke run of
each job composed from its shipped config (Hydra) with tiny overrides.
Integration tier: the pipeline functions with every section on (kronfluence,
the exact oracle, LDS; the Ray pipeline, worker memory, scaling).
Only well-formedness and finiteness are checked, never speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.baselines import BM25, exact_influence, raw_query_gradients
from benchmarks.evaluate.scoring import SharedCaptureScorer
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import batches_of
from tests.helpers import random_queries, random_sequences, tiny_model

CONF = Path(__file__).resolve().parents[2] / "conf"

# A demo small enough to build in seconds (tokenizer + a few steps of a 1-layer GPT-2).
TINY_DEMO = ["threads=1", "demo.n_filler_docs=24", "demo.n_facts=4", "demo.train_steps=4", "demo.n_embd=32", "demo.n_layer=1"]

TINY_EVALUATE = TINY_DEMO + [
    "chance_draws=5", "kronfluence=false",
    "fidelity.dims=[4]", "fidelity.top_k=3",
    "backdoor.n_docs=12", "backdoor.n_queries=2", "backdoor.epochs=1", "backdoor.poison_fraction=0.2",
    "backdoor.n_embd=16", "backdoor.n_head=2", "backdoor.n_layer=1",
    "small.n_train=8", "small.n_facts=2", "small.n_heldout_queries=1", "small.epochs=1",
    "small.lds_subsets=3", "small.top_k=3",
]

TINY_BENCHMARK = TINY_DEMO + [
    "n_docs=8", "throughput_batches=1", "throughput_queries=2", "query_counts=[2]", "warmup=0", "repeats=1",
    "merge.rows=2000", "merge.queries=5", "merge.top_k=4", "memory.n_docs=4", "memory.factor=2",
    "memory.docs_per_shard=4", "top_k=3",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One demo cache for every test here (the build is keyed by its spec)."""
    return str(tmp_path_factory.mktemp("demo-cache"))


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from benchmarks.evaluate import config as evaluate
    from benchmarks.speed import config as benchmark

    evaluate.register_configs()
    benchmark.register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


def assert_finite_numbers(obj, path="result"):
    """Every number in the JSON is finite (None marks a value that is legitimately absent)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert_finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert_finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{path} is {obj}"


def in_unit(x, lo=0.0, hi=1.0):
    return x is not None and lo - 1e-9 <= x <= hi + 1e-9


# ---- pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("empirical", [False, True])
def test_shared_capture_scorer_equals_separate_engines(empirical):
    """Every setting scored from shared captures equals its own engine's fit + score_batch, to the bit."""
    train, queries = random_sequences(10, seed=2), random_queries(3)
    tb, qb = batches_of(train, 4, 1), batches_of(queries, 2, 1)
    ids = [q.doc_id for q in queries]
    base = InfluenceConfig(precision="float64", empirical_fisher=empirical)
    settings = {"sketch": ProjectionSpec(6, mode="sketch"), "curv": ProjectionSpec(6, mode="curvature"),
                "curv3": ProjectionSpec(3, seed=5, mode="curvature")}
    scorer = SharedCaptureScorer(tiny_model("gpt2"), base, settings, "cpu")
    scorer.fit(tb)
    got = scorer.score(tb, scorer.query_gradients(qb, ids))
    for name, spec in [("ekfac", ProjectionSpec(0)), *settings.items()]:
        engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64", projection=spec,
                                                                     empirical_fisher=empirical))
        q = engine.query_gradients(qb, engine.fit(tb), ids)
        expected = torch.cat([engine.score_batch(b, q) for b in tb]).numpy()
        np.testing.assert_allclose(got[name], expected, rtol=1e-12, atol=1e-12)
    # Identity curvature: plain dot products of full per-sequence gradients; cosine is it normalised.
    raw = raw_query_gradients(scorer.full, qb, ids)
    dot = torch.cat([sum(raw.layer_scores(n, c) for n, c in scorer.full.capture_batch(b, False)[0].items())
                     for b in tb]).numpy()
    np.testing.assert_allclose(got["grad_dot"], dot, rtol=1e-12)
    assert np.abs(got["grad_cos"]).max() <= 1 + 1e-12


def test_oracle_with_huge_damping_is_the_gradient_dot_product():
    """``(F + lambda I)^-1 -> I / lambda``: the oracle's autograd gradients agree with the hooks' captures."""
    model = tiny_model("gpt2")
    train, queries = random_sequences(6, seed=3), random_queries(2)
    engine = InfluenceEngine(tiny_model("gpt2"), InfluenceConfig(precision="float64"))
    layers = engine.layers
    oracle = exact_influence(model, layers, train, queries, pad_id=1, damping=1e9).numpy() * 1e9
    raw = raw_query_gradients(engine, batches_of(queries, 2, 1), [q.doc_id for q in queries])
    dot = torch.cat([sum(raw.layer_scores(n, c) for n, c in engine.capture_batch(b, False)[0].items())
                     for b in batches_of(train, 3, 1)]).T.numpy()
    np.testing.assert_allclose(oracle, dot, rtol=1e-5)
    with pytest.raises(ValueError, match="max_params"):
        exact_influence(model, layers, train, queries, pad_id=1, max_params=10)


def test_bm25_ranks_documents_sharing_rare_terms_first():
    docs = ["the cat sat on the mat", "a dog ran in the park", "zyqor vantel grants root access", "the the the"]
    scores = BM25(docs).scores("Zyqor vantel prime")
    assert int(np.argmax(scores)) == 2 and scores[[0, 1, 3]].max() == 0.0


@pytest.mark.parametrize("name", ["evaluate", "benchmark"])
def test_shipped_configs_compose_and_validate(name):
    from benchmarks.evaluate import config as evaluate
    from benchmarks.speed import config as benchmark

    module = evaluate if name == "evaluate" else benchmark
    cfg = module.to_config(compose(name, []))
    assert cfg.name == "default"
    with pytest.raises(ValueError):
        module.to_config(compose(name, ["name=bad/name"]))


# ---- the jobs, tiny, composed from the shipped configs ------------------------------------


def test_evaluate_job_smoke(tmp_path, demo_cache):
    from benchmarks.evaluate.config import to_config
    from benchmarks.evaluate.report import format_report
    from benchmarks.evaluate.run import run_evaluation

    cfg = to_config(compose("evaluate", TINY_EVALUATE + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", "name=smoke", "small.lds=false"]))
    result = run_evaluation(cfg)
    written = json.loads(Path(tmp_path, "evaluations", "smoke.json").read_text())
    assert written["name"] == "smoke"
    assert_finite_numbers(written)
    methods = written["facts"]["methods"]
    assert set(methods) == {"ekfac", "ekfac_projected", "grad_dot", "grad_cos", "repsim", "bm25", "chance"}
    for m in methods.values():
        assert in_unit(m["all"]["mrr"]) and in_unit(m["all"]["strict_recall"])
    for m in written["backdoor"]["methods"].values():
        assert in_unit(m["auprc"]) and in_unit(m["precision_at_n_poisoned"])
    rows = written["fidelity"]["settings"]
    assert {(r["mode"], r["dim"]) for r in rows} == {("sketch", 4), ("curvature", 4)}
    assert all(in_unit(r["topk_overlap"]) and in_unit(r["spearman"], -1, 1) for r in rows)
    assert written["fidelity"]["recommended"]["mode"] in ("sketch", "curvature")
    oracle = written["small_world"]["oracle"]["methods"]
    assert in_unit(oracle["ekfac"]["spearman"], -1, 1) and "lds" not in written["small_world"]
    assert written["small_world"]["kronfluence"]["available"] is False
    assert "Planted facts" in format_report(result)


def test_benchmark_job_smoke(tmp_path, demo_cache):
    from benchmarks.speed.config import to_config
    from benchmarks.speed.report import format_report
    from benchmarks.speed.run import run_benchmark

    cfg = to_config(compose("benchmark", TINY_BENCHMARK + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", f"work_dir={tmp_path / 'work'}",
        "name=smoke", "ours=core", "kronfluence=false", "scaling=false", "memory.enabled=false"]))
    result = run_benchmark(cfg)
    written = json.loads(Path(tmp_path, "benchmarks", "smoke.json").read_text())
    assert_finite_numbers(written)
    for key in ("ceiling_tokens_per_s", "score_tokens_per_s", "score_to_ceiling_ratio", "score_tokens_per_s_dim0",
                "merge_rows_per_s"):
        assert written[key] > 0, key
    assert written["ours_seconds"]["2"] > 0
    # The core fits on every window; its fit in passes of a ceiling over them.
    vk = written["versus_kronfluence"]
    ours = vk["by_queries"]["2"]["ours"][f"dim={cfg.projection().dim}"]
    assert vk["fit_ceiling"]["windows"] == ours["num_windows"]
    assert written["fit_ceiling_passes"]["2"] == pytest.approx(ours["stage_timings"]["fit_s"] / vk["fit_ceiling"]["seconds"])
    # Not measured here: null with a reason, never a number.
    for key in ("kronfluence_seconds", "speedup_vs_kronfluence", "topk_overlap_vs_kronfluence"):
        assert written[key] == {"2": None}
    assert written["rss_ratio_10x"] is None and written["scaling_2_workers"] is None
    assert {"kronfluence", "memory", "scaling"} <= set(written["notes"])
    assert written["machine"]["cpu_count"] >= 1 and written["machine"]["torch"]
    assert written["merge"]["rows"] >= 2000
    assert "ceiling" in format_report(result)


def test_benchmark_kronfluence_longest_first_alone(tmp_path, demo_cache):
    """``kronfluence_corpus_order=false``: kronfluence runs once, batched longest first; the speedup and the overlap
    are against that run, the corpus-order figures are null."""
    pytest.importorskip("kronfluence")
    from benchmarks.speed.config import to_config
    from benchmarks.speed.report import format_report
    from benchmarks.speed.run import run_benchmark

    cfg = to_config(compose("benchmark", TINY_BENCHMARK + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", f"work_dir={tmp_path / 'work'}",
        "name=lf", "ours=core", "compare_dim0=false", "empirical_fisher=true", "kronfluence_corpus_order=false",
        "scaling=false", "memory.enabled=false", "merge.enabled=false"]))
    result = run_benchmark(cfg)
    assert_finite_numbers(result)
    point = result["versus_kronfluence"]["by_queries"]["2"]
    assert "kronfluence" not in point and point["kronfluence_longest_first"]["seconds"] > 0
    assert result["kronfluence_seconds"] == {"2": None} and result["speedup_vs_kronfluence"] == {"2": None}
    ours = point["ours"][next(iter(point["ours"]))]
    assert ours["speedup_vs_kronfluence_longest_first"] == pytest.approx(
        point["kronfluence_longest_first"]["seconds"] / ours["seconds"])
    assert 0 <= result["topk_overlap_vs_kronfluence"]["2"] <= 1
    assert "(longest first)" in format_report(result)
    assert not any(Path(tmp_path, "work").iterdir())  # scratch removed


def test_benchmark_without_query_counts_measures_throughput_only(tmp_path, demo_cache):
    """``query_counts=[]`` leaves the comparison with kronfluence out (it once crashed after the throughput phase)."""
    from benchmarks.speed.config import to_config
    from benchmarks.speed.run import run_benchmark

    cfg = to_config(compose("benchmark", TINY_BENCHMARK + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", f"work_dir={tmp_path / 'work'}",
        "name=throughput", "query_counts=[]", "scaling=false", "memory.enabled=false", "merge.enabled=false"]))
    run_benchmark(cfg)
    written = json.loads(Path(tmp_path, "benchmarks", "throughput.json").read_text())
    assert written["score_to_ceiling_ratio"] > 0 and "versus_kronfluence" in written["notes"]
    assert "ours_seconds" not in written and "versus_kronfluence" not in written


# ---- integration: every section ------------------------------------------------------------


def test_kronfluence_fits_on_the_documents_our_capped_runs_fit_on(tmp_path, demo_cache):
    """``max_documents``: kronfluence's fit, and the ceiling our fit is put in passes of, get the windows of the
    shards our job's validation samples."""
    import dataclasses

    from benchmarks.speed.config import to_config
    from benchmarks.speed.inputs import encode_inputs, prepare_inputs
    from benchmarks.speed.versus_kronfluence import fit_ceiling, fitting_documents
    from pipeline.corpus import hash_sample, list_corpus, make_shards

    cfg = to_config(compose("benchmark", TINY_BENCHMARK + [
        f"demo.cache_dir={demo_cache}", "n_docs=12", "docs_per_shard=4", "max_documents=5", "corpus_text=pydoc"]))
    work = tmp_path / "work"
    work.mkdir()
    inputs = prepare_inputs(cfg, str(work))
    assert len({text for _, text in inputs.docs}) == 12  # pydoc paragraphs: distinct documents
    cpu = torch.device("cpu")
    docs = fitting_documents(cfg, inputs, 2, str(work), cpu)
    shards = make_shards(list_corpus(inputs.corpus_path, "id", "text"), 4)
    chosen = hash_sample(shards, 0, 5)
    assert len(chosen) == 2  # the fewest shards (of 4 documents) holding 5
    assert docs == {inputs.docs[i][0] for s in chosen for i in range(s.row_start, s.row_end)}
    windows, _ = encode_inputs(inputs, cfg.window, 2)
    sampled = [w for w in windows if w.doc_id in docs]
    ceiling = fit_ceiling(cfg, inputs, docs, cpu)
    assert ceiling["windows"] == len(sampled) < len(windows) and ceiling["seconds"] > 0
    assert ceiling["tokens"] == sum(len(w.input_ids) for w in sampled)
    for cap in (0, 12):  # no cap, and a cap that leaves nothing out: kronfluence fits on every window
        assert fitting_documents(dataclasses.replace(cfg, max_documents=cap), inputs, 2, str(work), cpu) is None
    assert not [p for p in work.iterdir() if p.name.startswith("sample-")]  # its scratch storage is removed


def test_kronfluence_fit_on_a_subset_scores_every_window():
    """``fit_train``: factors from the subset, scores for every training window (kronfluence's example caps)."""
    pytest.importorskip("kronfluence")
    from benchmarks.baselines import kronfluence_pairwise
    from tests.helpers import TINY_PAD

    model = tiny_model("llama")
    train, queries = random_sequences(6), random_queries(2)
    kw = dict(damping=1e-3, empirical_fisher=True, train_batch_size=2, query_batch_size=2)
    capped, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train, queries, TINY_PAD,
                                     fit_train=train[:3], **kw)
    on_subset, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train[:3], queries, TINY_PAD, **kw)
    full, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train, queries, TINY_PAD, **kw)
    assert capped.shape == full.shape == (2, 6)
    torch.testing.assert_close(capped[:, :3], on_subset, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(capped, full, rtol=1e-3)  # other factors than the fit on every window


def test_kronfluence_baseline_with_sampled_labels_is_seeded():
    """The baseline's true-Fisher task (labels drawn by our `draw_tokens`) runs, and its seed matters."""
    pytest.importorskip("kronfluence")
    from benchmarks.baselines import kronfluence_pairwise
    from tests.helpers import TINY_PAD

    model = tiny_model("llama")
    train, queries = random_sequences(6), random_queries(2)
    kw = dict(damping=1e-3, empirical_fisher=False, train_batch_size=2, query_batch_size=2)
    a, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train, queries, TINY_PAD, seed=1, **kw)
    b, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train, queries, TINY_PAD, seed=1, **kw)
    c, _ = kronfluence_pairwise(model, ["model.layers.0.mlp.up_proj"], train, queries, TINY_PAD, seed=2, **kw)
    assert a.shape == (2, 6) and bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.integration
def test_evaluate_all_sections_with_kronfluence(tmp_path, demo_cache):
    pytest.importorskip("kronfluence")
    from benchmarks.evaluate.config import to_config
    from benchmarks.evaluate.run import run_evaluation

    # Empirical Fisher on both sides: ours and kronfluence compute the same numbers (no label draws).
    cfg = to_config(compose("evaluate", TINY_EVALUATE + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", "name=full", "kronfluence=true",
        "empirical_fisher=true"]))
    result = run_evaluation(cfg)
    assert_finite_numbers(result)
    sw = result["small_world"]
    assert sw["kronfluence"]["available"] is True
    assert sw["kronfluence"]["relative_error"] < 1e-6
    assert sw["kronfluence"]["spearman"] > 0.999
    lds = sw["lds"]
    assert lds["subsets"] == 3 and set(lds["methods"]) >= {"ekfac", "oracle", "kronfluence", "bm25", "chance"}
    assert all(v is None or -1 <= v <= 1 for v in lds["methods"].values())
    assert lds["seed_to_seed_ceiling"] is None or -1 <= lds["seed_to_seed_ceiling"] <= 1


@pytest.mark.integration
def test_benchmark_all_sections_with_ray(tmp_path, demo_cache):
    pytest.importorskip("kronfluence")
    from benchmarks.speed.config import to_config
    from benchmarks.speed.run import run_benchmark
    from tests.helpers import scratch_env

    cfg = to_config(compose("benchmark", TINY_BENCHMARK + [
        f"storage.root={tmp_path}", f"demo.cache_dir={demo_cache}", f"work_dir={tmp_path / 'work'}",
        "name=full", "ours=pipeline", "compare_dim0=true", "empirical_fisher=true"]))
    # Ray writes its session files (short socket paths) and auth token under a scratch HOME.
    with scratch_env():
        result = run_benchmark(cfg)
    assert_finite_numbers(result)
    for key in ("kronfluence_seconds", "ours_seconds", "speedup_vs_kronfluence", "topk_overlap_vs_kronfluence"):
        assert result[key]["2"] is not None and result[key]["2"] >= 0, key
    assert 0 <= result["topk_overlap_vs_kronfluence_dim0"]["2"] <= 1
    # kronfluence again on the same windows batched longest first: its columns put back in corpus order give the
    # same scores (empirical Fisher: no label draws), so that speedup is against the same computation.
    assert result["kronfluence_longest_first_seconds"]["2"] > 0 and result["speedup_vs_kronfluence_longest_first"]["2"] > 0
    sorted_run = result["versus_kronfluence"]["by_queries"]["2"]["kronfluence_longest_first"]
    assert sorted_run["max_abs_difference_vs_corpus_order"] <= 1e-4 * sorted_run["max_abs_score"]
    assert result["rss_ratio_10x"] > 0 and result["scaling_2_workers"] > 0
    assert result["memory"]["runs"]["8"]["num_windows"] > result["memory"]["runs"]["4"]["num_windows"]
    assert "pipeline" in result["versus_kronfluence"]["ours_method"]
