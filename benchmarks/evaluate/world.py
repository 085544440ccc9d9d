"""The demo world every experiment of the evaluation draws from: model, tokenizer, documents, facts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.core.text import batches_of
from pipeline.core.forward import sequence_losses
from pipeline.core.text import TokenWindow
from pipeline.demo import DemoArtifacts, DemoSpec, build_demo
from pipeline.model_io import load_model_and_tokenizer


@dataclass
class DemoWorld:
    """The demo build: model, tokenizer, corpus rows and facts."""

    spec: DemoSpec
    artifacts: DemoArtifacts
    model: Any
    tokenizer: Any
    docs: list[dict]
    facts: list[dict]

    def window(self, override: int | None) -> int:
        """Tokens per training window: ``override``, or the demo's own window when it is None."""
        return int(override) if override is not None else int(self.spec.window)


def load_demo_world(cache_dir: str, spec: DemoSpec) -> DemoWorld:
    """Build (or reuse) the demo of ``spec`` under ``cache_dir`` and load all of it."""
    artifacts = build_demo(cache_dir, spec)
    model, tokenizer = load_model_and_tokenizer(artifacts.model_dir)
    docs = pq.read_table(artifacts.corpus_path).to_pylist()
    with open(artifacts.facts_path) as f:
        facts = json.load(f)
    return DemoWorld(spec, artifacts, model, tokenizer, docs, facts)


@torch.no_grad()
def completion_logprobs(model, queries: list[TokenWindow], pad_id: int, device="cpu") -> np.ndarray:
    """``f(q) = log p(completion | prompt)``, summed over completion tokens, per query: ``(Q,)``."""
    model.eval()
    out = []
    for batch in batches_of(queries, 16, pad_id):
        out.append(-sequence_losses(model, batch.to(device)).double().cpu())
    return torch.cat(out).numpy()
