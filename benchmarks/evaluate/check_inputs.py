"""The inputs of the in-process checks on SmolLM2 (rank, products, eigendecompositions, fitting on a sample).

``--data`` picks one of the data sets the default was chosen on (``load_inputs``):

- ``benchmark`` (the default): the speed benchmark's inputs
  (``jobs/benchmark.py model.preset=smollm2``, built by
  ``benchmarks.speed.inputs``): the pretrained SmolLM2-135M, the
  planted-facts recipe's documents cycled to ``--n-docs``, windows of
  ``--window`` tokens, and queries made from the corpus text.
- ``pydoc``: the pretrained model on distinct text at any size up to ~900
  windows of 128 tokens, Python's own help topics (the benchmark corpus
  repeats its documents beyond the recipe's).
- ``facts``: tests/eval/test_smollm2_default_fidelity.py's inputs: the
  pretrained model, the planted-facts recipe with seed ``--seed`` (8 facts, 2
  copies each, 32 filler documents, windows of 64 tokens; 48 windows) and its
  8 fact queries.
- ``finetuned``: the SmolLM2 fine-tuned on planted facts
  (``benchmarks.smollm2_facts``, built and cached on first use: 6-18
  minutes on the 2-core VMs), its 128 documents in windows of 128 tokens and its 8
  fact queries: the inputs of ``jobs/evaluate.py world=smollm2``.

Of each, the first ``--windows`` windows and ``--queries`` queries.
``--n-docs`` and ``--window`` are the benchmark's only; ``--seed`` the facts'.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.speed.config import BenchmarkConfig, BenchModelConfig
from benchmarks.speed.inputs import encode_inputs, prepare_inputs, read_query_rows, write_queries
from pipeline.core.influence import InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.text import Batch, TokenWindow, batches_of, encode_documents, encode_query, resolve_tokenisation

BATCH_SIZE = 8


DATA_SETS = ("benchmark", "pydoc", "facts", "finetuned")
FACTS_WINDOW = 64


def add_input_arguments(parser: argparse.ArgumentParser, windows: int = 64, queries: int = 16) -> None:
    """``--data``, ``--windows``, ``--queries``, ``--n-docs``, ``--window`` and ``--seed``, read by ``load_inputs``."""
    parser.add_argument("--data", choices=DATA_SETS, default="benchmark", help="which inputs (see check_inputs)")
    parser.add_argument("--windows", type=int, default=windows, help="the first N training windows")
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--n-docs", type=int, default=128, help="documents of the benchmark corpus")
    parser.add_argument("--window", type=int, default=128, help="tokens per window (benchmark, pydoc)")
    parser.add_argument("--seed", type=int, default=13, help="the planted-facts recipe's seed (--data facts)")


def load_inputs(args: argparse.Namespace) -> "CheckInputs":
    """The inputs ``args.data`` names, cut to the first ``args.windows`` windows and ``args.queries`` queries."""
    make = {"benchmark": benchmark_inputs, "pydoc": pydoc_inputs, "facts": lambda a: facts_inputs(a.seed),
            "finetuned": lambda a: finetuned_inputs()}
    inputs = make[args.data](args)
    return replace(inputs, train=inputs.train[: args.windows], queries=inputs.queries[: args.queries])


@dataclass
class CheckInputs:
    """A model, its pad id, training windows and queries, batched by ``BATCH_SIZE`` on demand."""

    model: torch.nn.Module
    pad: int
    train: list[TokenWindow]
    queries: list[TokenWindow]

    @property
    def batches(self) -> list[Batch]:
        return batches_of(self.train, BATCH_SIZE, self.pad)

    @property
    def query_batches(self) -> list[Batch]:
        return batches_of(self.queries, BATCH_SIZE, self.pad)

    @property
    def query_ids(self) -> list[str]:
        return [q.doc_id for q in self.queries]

    def describe(self) -> str:
        tokens = sum(len(t.input_ids) for t in self.train)
        return f"{len(self.train)} windows, {tokens} tokens, {len(self.queries)} queries"


def benchmark_inputs(args: argparse.Namespace) -> CheckInputs:
    """The benchmark's SmolLM2 inputs for the arguments of ``add_input_arguments``."""
    cfg = BenchmarkConfig(model=BenchModelConfig(preset="smollm2"), n_docs=args.n_docs, window=args.window,
                          query_counts=[args.queries])
    with tempfile.TemporaryDirectory() as work:
        inputs = prepare_inputs(cfg, work)
        train, queries = encode_inputs(inputs, args.window, args.queries)
    return CheckInputs(inputs.model, inputs.tokenizer.pad_token_id, train[: args.windows], queries)


def smollm2():
    """The pretrained SmolLM2-135M and its tokenizer, from the repository's cache (built there if absent)."""
    from pipeline import pretrained
    from pipeline.model_io import load_model_and_tokenizer

    return load_model_and_tokenizer(pretrained.build_smollm2(_repo() / pretrained.DEFAULT_CACHE_DIR))


def _repo() -> Path:
    return Path(__file__).resolve().parents[2]


def pydoc_inputs(args: argparse.Namespace) -> CheckInputs:
    """The pretrained SmolLM2 on Python's help topics (``pydoc_data.topics``): distinct text, no repeats.

    Every topic is a document, in sorted order; its windows of ``--window``
    tokens as the pipeline makes them, the first ``--windows`` of them; the
    ``--queries`` queries are made from the topics the windows cover, by the
    speed benchmark's recipe (a dozen words prompt the next four).
    """
    from pydoc_data.topics import topics

    model, tok = smollm2()
    tokenisation = resolve_tokenisation(tok, None, None)
    docs = [(name, topics[name]) for name in sorted(topics)]
    train, _ = encode_documents(tok, docs, args.window, tokenisation)
    train = train[: args.windows]
    covered = {w.doc_id for w in train}
    texts = [text for name, text in docs if name in covered]
    # Spread the queries over the covered topics rather than taking the first few.
    step = max(1, len(texts) // max(1, args.queries))
    texts = texts[::step] + [t for i, t in enumerate(texts) if i % step]
    with tempfile.TemporaryDirectory() as work:
        path = str(Path(work) / "queries.jsonl")
        write_queries(path, texts, args.queries)
        rows = read_query_rows(path)
    queries = [encode_query(tok, r["id"], r["prompt"], r["completion"], args.window, tokenisation) for r in rows]
    return CheckInputs(model, tok.pad_token_id, train, queries)


def facts_inputs(seed: int) -> CheckInputs:
    """tests/eval/test_smollm2_default_fidelity.py's inputs, recipe ``seed``."""
    from benchmarks.smollm2_facts import FactsSpec, make_corpus

    model, tok = smollm2()
    spec = FactsSpec(n_facts=8, copies_per_fact=2, n_filler_docs=32, window=FACTS_WINDOW, seed=seed)
    docs, facts = make_corpus(spec, tok)
    return _documents_and_facts(model, tok, docs, facts, FACTS_WINDOW)


def finetuned_inputs() -> CheckInputs:
    """``jobs/evaluate.py world=smollm2``'s inputs: the fine-tuned SmolLM2, its 128 documents, its 8 fact queries."""
    from benchmarks.smollm2_facts import FactsSpec, build_smollm2_facts
    from pipeline import pretrained
    from pipeline.model_io import load_model_and_tokenizer

    artifacts = build_smollm2_facts(_repo() / pretrained.DEFAULT_CACHE_DIR, FactsSpec())
    with open(artifacts.corpus_path) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    with open(artifacts.facts_path) as f:
        facts = json.load(f)
    model, tok = load_model_and_tokenizer(artifacts.model_dir)
    return _documents_and_facts(model, tok, docs, facts, FactsSpec().window)


def _documents_and_facts(model, tok, docs: list[dict], facts: list[dict], window: int) -> CheckInputs:
    """Documents (``id``, ``text``) in windows of ``window`` tokens and fact queries, as the pipeline encodes them."""
    tokenisation = resolve_tokenisation(tok, None, None)
    train, skipped = encode_documents(tok, [(d["id"], d["text"]) for d in docs], window, tokenisation)
    if skipped:
        print(f"skipped {len(skipped)} empty documents")
    queries = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], window, tokenisation) for f in facts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return CheckInputs(model, pad, train, queries)


def scores_of(engine: InfluenceEngine, batches: list[Batch], queries: QueryGradients) -> np.ndarray:
    """``(windows, queries)`` scores of ``batches`` against preconditioned ``queries``, float64."""
    return torch.cat([engine.score_batch(b, queries).detach().to(torch.float64).cpu() for b in batches]).numpy()
