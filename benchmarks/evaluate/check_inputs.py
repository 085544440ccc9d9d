"""The inputs of the in-process checks on SmolLM2 (rank, products, eigendecompositions, fitting on a sample).

The speed benchmark's inputs (``jobs/benchmark.py model.preset=smollm2``,
built by ``benchmarks.speed.inputs``): the pretrained SmolLM2-135M, the
planted-facts recipe's documents cycled to ``--n-docs``, windows of
``--window`` tokens, of which the first ``--windows``, and ``--queries``
queries made from the corpus text. The benchmark corpus repeats its
documents beyond the recipe's, so ``pydoc_inputs`` offers distinct text at
any size up to ~900 windows of 128 tokens: Python's own help topics.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.speed.config import BenchmarkConfig, BenchModelConfig
from benchmarks.speed.inputs import encode_inputs, prepare_inputs, read_query_rows, write_queries
from pipeline.core.influence import InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.text import Batch, TokenWindow, batches_of, encode_documents, encode_query, resolve_tokenisation

BATCH_SIZE = 8


def add_input_arguments(parser: argparse.ArgumentParser, windows: int = 64, queries: int = 16) -> None:
    """``--windows``, ``--queries``, ``--n-docs`` and ``--window``, read by ``benchmark_inputs``."""
    parser.add_argument("--windows", type=int, default=windows, help="the first N training windows")
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--n-docs", type=int, default=128, help="documents of the benchmark corpus")
    parser.add_argument("--window", type=int, default=128, help="tokens per window")


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

    repo = Path(__file__).resolve().parents[2]
    return load_model_and_tokenizer(pretrained.build_smollm2(repo / pretrained.DEFAULT_CACHE_DIR))


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


def scores_of(engine: InfluenceEngine, batches: list[Batch], queries: QueryGradients) -> np.ndarray:
    """``(windows, queries)`` scores of ``batches`` against preconditioned ``queries``, float64."""
    return torch.cat([engine.score_batch(b, queries).detach().to(torch.float64).cpu() for b in batches]).numpy()
