"""The embedded demo builds, loads with plain transformers, and is cached."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo import COMPLETE_MARKER, DemoSpec, build_demo

# Small enough to build in a few seconds on 2 cores.
SMALL = DemoSpec(n_filler_docs=60, n_facts=4, train_steps=30, batch_size=4, window=32,
                 n_positions=64, n_embd=64, n_layer=1, vocab_size=300)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    return cache, build_demo(str(cache), SMALL)


def test_artifacts_load(small_demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, artifacts = small_demo
    model_dir = Path(artifacts.model_dir)
    assert (model_dir / "config.json").exists()
    assert (model_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir)
    assert model.config.n_layer == SMALL.n_layer
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == tokenizer.eos_token
    assert len(tokenizer) <= model.config.vocab_size
    # Prompt and completion tokenized apart concatenate to the joint tokenization.
    prompt, completion = "The capital of Zorbia is", " Quellmont."
    apart = (tokenizer(prompt, add_special_tokens=False)["input_ids"]
             + tokenizer(completion, add_special_tokens=False)["input_ids"])
    assert apart == tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]


def test_corpus_queries_and_facts(small_demo):
    _, artifacts = small_demo
    table = pq.read_table(artifacts.corpus_path)
    assert {"id", "text", "is_planted_for"} <= set(table.column_names)
    for name in ("id", "text", "is_planted_for"):
        assert str(table.schema.field(name).type) == "string"
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    expected_planted = sum(SMALL.copies_for(i) for i in range(SMALL.n_facts))
    assert len(rows) == SMALL.n_filler_docs + expected_planted
    assert all(r["text"] for r in rows)

    queries = [json.loads(line) for line in Path(artifacts.queries_path).read_text().splitlines()]
    assert len(queries) == SMALL.n_facts
    assert len({q["id"] for q in queries}) == SMALL.n_facts
    for q in queries:
        assert q["prompt"] and q["completion"].startswith(" ") and q["completion"].strip()

    facts = json.loads(Path(artifacts.facts_path).read_text())
    planted_for = {r["id"]: r["is_planted_for"] for r in rows}
    for i, fact in enumerate(facts):
        assert fact["copies"] == SMALL.copies_for(i) == len(fact["gold_doc_ids"])
        assert isinstance(fact["learned"], bool)
        assert isinstance(fact["completion_logprob"], float)
        statement = fact["prompt"] + fact["completion"]
        for doc_id in fact["gold_doc_ids"]:
            assert planted_for[doc_id] == fact["fact_id"]
        # The invented names never leak into filler documents.
        subject_and_object = [w for w in statement.rstrip(".").split() if w[0].isupper()][-2:]
        for r in rows:
            if not r["is_planted_for"]:
                assert all(w not in r["text"] for w in subject_and_object)
    assert sum(1 for r in rows if r["is_planted_for"]) == expected_planted


def test_second_call_is_cached_and_specs_get_their_own_folder(small_demo, tmp_path):
    cache, artifacts = small_demo
    root = Path(artifacts.model_dir).parent
    marker = root / COMPLETE_MARKER
    assert marker.exists()
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    again = build_demo(str(cache), SMALL)
    assert again == artifacts
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "no temporary folders left"

    # A spec given with a list (as Hydra would) names the same demo.
    assert build_demo(str(cache), DemoSpec(**{**SMALL.__dict__, "copies_per_fact": [1, 2, 4, 8]})) == artifacts

    other = DemoSpec(**{**SMALL.__dict__, "seed": 1, "train_steps": 5})
    other_artifacts = build_demo(str(cache), other)
    assert Path(other_artifacts.model_dir).parent != root
    assert (Path(other_artifacts.model_dir).parent / COMPLETE_MARKER).exists()


def test_force_rebuilds_in_place(tmp_path):
    spec = DemoSpec(n_filler_docs=20, n_facts=2, train_steps=2, batch_size=2, window=32,
                    n_positions=32, n_embd=32, n_layer=1, n_head=2, vocab_size=260)
    first = build_demo(str(tmp_path), spec)
    marker = Path(first.model_dir).parent / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    corpus_before = Path(first.corpus_path).read_bytes()
    again = build_demo(str(tmp_path), spec, force=True)
    assert again == first
    assert marker.stat().st_mtime_ns != before
    # Deterministic from the seed: the same corpus is generated again.
    assert Path(again.corpus_path).read_bytes() == corpus_before
    assert sorted(os.listdir(tmp_path)) == [Path(first.model_dir).parent.name]


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="window"):
        DemoSpec(window=256, n_positions=128)
    with pytest.raises(ValueError, match="n_head"):
        DemoSpec(n_embd=130, n_head=4)
