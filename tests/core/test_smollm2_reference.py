"""Reference test on a real pretrained model: SmolLM2-135M-Instruct, projection off, against kronfluence.

Integration tier. The model is built by ``pipeline.pretrained.build_smollm2``
into the project's default cache (``outputs/pretrained-cache``, shared with
the benchmarks; a 93 MB download and ~30-60 s of conversion the first time,
then reused).

Data: 6 short English documents (the first 48 words of prose of the first
6 topics of the standard library's offline help text, ``pydoc_data.topics``),
encoded with the tokenizer's defaults (``resolve_tokenisation``) in windows of
32 tokens (18 windows; 12 documents and 32 windows until 2026-12-07, when
halving them took about 60 s off CI's slowest tier); 3 fixed queries about
Python statements.

Tracked layers: the three MLP projections of the first, middle and last
blocks, ``model.layers.(0|15|29).mlp.(gate|up|down)_proj``: 9 layers of the
real size (576 x 1536 or 1536 x 576, 8.0M parameters), so the test runs in a
couple of minutes on 2 cores while still covering both layer shapes and
depths. Damping is fixed (``DAMPING``) and the empirical Fisher is used, so
both sides are deterministic: our EK-FAC with projection off and
kronfluence's EK-FAC pairwise scores compute the same float64 quantities
(docs/design.md#maths) and must agree to rounding error. Both sides see exactly
the same batches: HF's Llama keeps RMSNorm and rotary angles in float32 even in
a float64 model, so a different batch layout would change scores at ~1e-7
relative (see tests/core/test_reference_kronfluence.py).

Our float32 scores (the default precision) are compared with our float64
ones at a looser tolerance, and must give the same top 10 for every query.
"""

from __future__ import annotations

import copy
import re
import time

import pytest
import torch

from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import batches_of, encode_documents, encode_query, resolve_tokenisation

pytest.importorskip("kronfluence")

from benchmarks.baselines import kronfluence_pairwise  # noqa: E402

pytestmark = pytest.mark.integration

MODULES = r"model\.layers\.(0|15|29)\.mlp\.(gate|up|down)_proj"
N_DOCS = 6
WORDS_PER_DOC = 48
WINDOW = 32
QUERIES = [
    ("q-assert", "Assert statements are a convenient way to", " insert debugging assertions into a program."),
    ("q-break", "In a loop, the break statement", " terminates the nearest enclosing loop."),
    ("q-lambda", "A lambda expression creates", " an anonymous function."),
]
DAMPING = 1e-2
# Batch sizes, identical on both sides: fitting and scoring (kronfluence uses
# one size for both), and queries.
TRAIN_BATCH = 8
QUERY_BATCH = len(QUERIES)

# max |ours - kronfluence| / max |kronfluence|, float64 on both sides. Measured
# 5.8e-14 (Frobenius 1.1e-13; max |score| 2.1e4): 1e-9 leaves four orders of
# margin and stays far below the smallest gap between two neighbouring scores
# of a query (1.1e-5 of max |score|), so the full rankings are compared too.
REL_TOL_FLOAT64 = 1e-9
# max |float32 - float64| / max |float64|, our engine. Measured 1.2e-5
# (Frobenius 2.2e-5). The top 10 of every query are identical, in order; the
# closest neighbours there are 1.1e-5 of max |score| apart, the same order as
# the float32 error, so a machine with other float32 kernels could swap that pair.
REL_TOL_FLOAT32 = 1e-4
TOP_K = 10


def help_documents(n: int, words: int) -> list[tuple[str, str]]:
    """``(topic, text)``: the first ``words`` words of prose of the first ``n`` help topics that have enough."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        # Prose paragraphs only: not the underlined title, not indented grammar or code.
        paragraphs = [p for p in topics[name].split("\n\n")[1:] if p.strip() and not p.startswith(" ")]
        text = " ".join(" ".join(paragraphs).split()[:words])
        if len(text.split()) == words:
            docs.append((name, text))
        if len(docs) == n:
            return docs
    raise AssertionError(f"pydoc_data.topics has fewer than {n} topics with {words} words of prose")


def our_scores(model, train, queries, pad_id: int, precision: str) -> torch.Tensor:
    """Our projection-off EK-FAC scores ``(Q, N)``, fitted on ``train`` (float64 on return)."""
    config = InfluenceConfig(modules=MODULES, projection=ProjectionSpec(0), damping=DAMPING,
                             empirical_fisher=True, precision=precision)
    engine = InfluenceEngine(copy.deepcopy(model), config, "cpu")
    assert len(engine.layers) == 9
    batches = batches_of(train, TRAIN_BATCH, pad_id)
    factors = engine.fit(batches)
    q = engine.query_gradients(batches_of(queries, QUERY_BATCH, pad_id), factors, [s.doc_id for s in queries])
    return torch.cat([engine.score_batch(b, q) for b in batches], 0).T.to(torch.float64)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Per query, the training windows from most to least influential: ``(Q, N)`` indices."""
    return torch.argsort(scores, dim=1, descending=True, stable=True)


def test_projection_off_equals_kronfluence_ekfac_on_smollm2(smollm2_dir):
    from pipeline.model_io import load_model_and_tokenizer

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(smollm2_dir)
    model.eval()
    tokenisation = resolve_tokenisation(tokenizer, None, None)
    train, skipped = encode_documents(tokenizer, help_documents(N_DOCS, WORDS_PER_DOC), WINDOW, tokenisation)
    assert not skipped
    queries = [encode_query(tokenizer, qid, p, c, WINDOW, tokenisation) for qid, p, c in QUERIES]
    pad_id = tokenizer.pad_token_id

    t0 = time.perf_counter()
    ours64 = our_scores(model, train, queries, pad_id, "float64")
    t1 = time.perf_counter()
    ours32 = our_scores(model, train, queries, pad_id, "float32")
    t2 = time.perf_counter()
    modules = [name for name, _ in model.named_modules() if re.fullmatch(MODULES, name)]
    ref, _ = kronfluence_pairwise(model, modules, train, queries, pad_id, damping=DAMPING, empirical_fisher=True,
                                  precision="float64", train_batch_size=TRAIN_BATCH,
                                  query_batch_size=QUERY_BATCH)
    t3 = time.perf_counter()

    assert ref.shape == ours64.shape == ours32.shape == (len(queries), len(train))
    assert torch.isfinite(ours64).all() and torch.isfinite(ours32).all()
    scale = ref.abs().max()
    err64 = float((ours64 - ref).abs().max() / scale)
    frob64 = float(torch.linalg.norm(ours64 - ref) / torch.linalg.norm(ref))
    err32 = float((ours32 - ours64).abs().max() / ours64.abs().max())
    frob32 = float(torch.linalg.norm(ours32 - ours64) / torch.linalg.norm(ours64))
    top32 = ranking(ours32)[:, :TOP_K]
    top64 = ranking(ours64)[:, :TOP_K]
    # Smallest gap between neighbours in each query's ranking (all, and within the top 10 and the
    # 11th), relative to the scale: how far the scores are from a tie the tolerances could flip.
    sorted_ref = ref.sort(dim=1, descending=True).values
    gap_all = float((sorted_ref[:, :-1] - sorted_ref[:, 1:]).min() / scale)
    gap_top = float((sorted_ref[:, :TOP_K] - sorted_ref[:, 1 : TOP_K + 1]).min() / scale)
    print(
        f"SmolLM2 {len(train)} windows x {len(queries)} queries, 9 layers, damping {DAMPING}: "
        f"float64 vs kronfluence max rel {err64:.3e} (Frobenius {frob64:.3e}); "
        f"float32 vs float64 max rel {err32:.3e} (Frobenius {frob32:.3e}); "
        f"max |score| {float(scale):.3e}, smallest neighbour gap / max |score| {gap_all:.3e} "
        f"(top {TOP_K}: {gap_top:.3e}); time: load {t0 - started:.1f} s, ours float64 {t1 - t0:.1f} s, "
        f"float32 {t2 - t1:.1f} s, kronfluence {t3 - t2:.1f} s"
    )

    assert err64 < REL_TOL_FLOAT64, f"float64 vs kronfluence: max relative difference {err64:.3e}"
    assert torch.equal(ranking(ours64), ranking(ref)), "float64 and kronfluence rank the windows differently"
    assert err32 < REL_TOL_FLOAT32, f"float32 vs float64: max relative difference {err32:.3e}"
    assert torch.equal(top32, top64), f"float32 and float64 top {TOP_K} differ: {top32} vs {top64}"
