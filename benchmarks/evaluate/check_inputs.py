"""The inputs of the in-process checks on SmolLM2 (rank, products, eigendecompositions, fitting on a sample).

The speed benchmark's inputs (``jobs/benchmark.py model.preset=smollm2``,
built by ``benchmarks.speed.inputs``): the pretrained SmolLM2-135M, the
planted-facts recipe's documents cycled to ``--n-docs``, windows of
``--window`` tokens, of which the first ``--windows``, and ``--queries``
queries made from the corpus text.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.speed.config import BenchmarkConfig, BenchModelConfig
from benchmarks.speed.inputs import encode_inputs, prepare_inputs
from pipeline.core.influence import InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.text import Batch, TokenWindow, batches_of

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


def scores_of(engine: InfluenceEngine, batches: list[Batch], queries: QueryGradients) -> np.ndarray:
    """``(windows, queries)`` scores of ``batches`` against preconditioned ``queries``, float64."""
    return torch.cat([engine.score_batch(b, queries).detach().to(torch.float64).cpu() for b in batches]).numpy()
