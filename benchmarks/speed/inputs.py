"""What every speed measurement runs on: a model, a corpus of N documents and query files, and a timer.

The corpus and queries come from the demo build (``pipeline.demo``), or with
``model.preset=smollm2`` from the pretrained SmolLM2-135M and the planted-facts recipe's documents
(``benchmarks.smollm2_facts.make_corpus``, no fine-tuning): documents are cycled under new ids to reach N. Timings are medians of
``repeats`` runs after ``warmup`` untimed ones.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.speed.config import PRESETS, BenchmarkConfig
from pipeline.core.forward import sequence_losses
from pipeline.core.text import TokenWindow, encode_documents, encode_query, resolve_tokenisation
from pipeline.demo import build_demo
from pipeline.model_io import load_model_and_tokenizer
from pipeline.tiny_lm import new_gpt2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ceiling:
    """The ceiling: a plain forward + backward (summed loss, every weight's gradient) over batches.

    One copy of the model, made once and kept warm for every measurement,
    so that a measurement alternating with a score pass times the same thing
    as a block of repeats. (A fresh copy per measurement with one batch of
    warm-up, which the evaluate checks used until 2026-12-05, measured the
    same passes 15-20% slower on SmolLM2: docs/figures.md, "Speed on SmolLM2".)
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.model = copy.deepcopy(model).to(device).eval()
        self.model.requires_grad_(True)
        self._warm = False

    def run(self, batches: list) -> None:
        """One ceiling pass over ``batches``."""
        for batch in batches:
            self.model.zero_grad(set_to_none=True)
            sequence_losses(self.model, batch.to(self.device)).sum().backward()

    def seconds(self, batches: list) -> float:
        """Wall seconds of one pass over ``batches``; the first call runs one untimed pass before."""
        if not self._warm:
            self.run(batches)
            self._warm = True
        _sync(self.device)
        started = time.perf_counter()
        self.run(batches)
        _sync(self.device)
        return time.perf_counter() - started


def timed_median(fn, warmup: int, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones, and every run."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def ceiling_median(model: torch.nn.Module, batches: list, warmup: int, repeats: int,
                   device: torch.device) -> tuple[float, list[float]]:
    """Median seconds of one ``Ceiling`` pass over ``batches`` (``timed_median``) and its runs; the copy is freed on return."""
    ceiling = Ceiling(model, device)
    return timed_median(lambda: ceiling.run(batches), warmup, repeats, device)


@dataclass
class BenchInputs:
    """The model (a local HF folder, loaded), the corpus (Parquet and rows) and query files by count."""

    model_dir: str
    corpus_path: str
    docs: list[tuple[str, str]]
    queries_paths: dict[int, str]
    model: Any
    tokenizer: Any


def pydoc_paragraphs(min_words: int = 16) -> list[str]:
    """The distinct paragraphs of Python's help topics (``pydoc_data.topics``) of at least ``min_words`` words.

    In sorted topic order, whitespace collapsed: text every Python has, with no repeats (1,063 paragraphs).
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def write_corpus(path: str, source: list[str], n_docs: int, per_doc: int = 1) -> list[tuple[str, str]]:
    """``n_docs`` documents of ``per_doc`` texts each, cycled from ``source`` under ids ``b0000000``...; Parquet."""
    docs = [(f"b{i:07d}", " ".join(source[(i * per_doc + j) % len(source)] for j in range(per_doc)))
            for i in range(n_docs)]
    pq.write_table(pa.table({"id": [d[0] for d in docs], "text": [d[1] for d in docs]}), path)
    return docs


def write_queries(path: str, texts: list[str], count: int) -> None:
    """``count`` queries from corpus texts: the first dozen words prompt the next four."""
    rows, i = [], 0
    while len(rows) < count:
        words = texts[i % len(texts)].split()
        offset = (i // len(texts)) % 4  # later passes over the texts start a little further in
        if len(words) >= offset + 16:
            rows.append({"id": f"bq{len(rows):04d}", "prompt": " ".join(words[offset : offset + 12]),
                         "completion": " " + " ".join(words[offset + 12 : offset + 16])})
        i += 1
        if i > 100 * count + 100 and not rows:
            raise ValueError("no corpus text has 16 words; cannot make benchmark queries")
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def prepare_inputs(cfg: BenchmarkConfig, work: str) -> BenchInputs:
    """The preset's texts (or ``corpus_text``'s) as an N-document corpus and query files under ``work``; the model."""
    if cfg.model.preset == "smollm2" and not cfg.model.path:
        # Speed does not depend on what the weights learned: the pretrained model (no 18-minute fine-tune)
        # with the planted-facts recipe's documents (128 texts of up to 128 tokens).
        from benchmarks.smollm2_facts import FactsSpec, make_corpus
        from pipeline.pretrained import build_smollm2

        smollm2_dir = build_smollm2(cfg.model.pretrained_cache_dir)
        _, tok = load_model_and_tokenizer(smollm2_dir)
        texts = [d["text"] for d in make_corpus(FactsSpec(), tok)[0]]
    else:
        demo = build_demo(cfg.demo.cache_dir, cfg.demo.spec())
        texts = pq.read_table(demo.corpus_path, columns=["text"]).column(0).to_pylist()
    if cfg.corpus_text == "pydoc":
        texts = pydoc_paragraphs()
    corpus_path = os.path.join(work, f"corpus-{cfg.n_docs}.parquet")
    docs = write_corpus(corpus_path, texts, cfg.n_docs, cfg.texts_per_doc)
    queries_paths = {}
    for q in sorted({int(x) for x in [*cfg.query_counts, cfg.throughput_queries]}):
        queries_paths[q] = os.path.join(work, f"queries-{q}.jsonl")
        write_queries(queries_paths[q], texts, q)
    if cfg.model.path:
        model_dir = cfg.model.path
    elif cfg.model.preset == "smollm2":
        model_dir = smollm2_dir
    elif cfg.model.preset == "demo":
        model_dir = demo.model_dir
    else:
        preset = PRESETS[cfg.model.preset]
        _, tok = load_model_and_tokenizer(demo.model_dir)
        model = new_gpt2(len(tok), n_embd=preset["n_embd"], n_layer=preset["n_layer"], n_head=preset["n_head"],
                         n_positions=max(preset["n_positions"], cfg.window), eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, seed=0)
        model_dir = os.path.join(work, f"model-{cfg.model.preset}")
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return BenchInputs(model_dir, corpus_path, docs, queries_paths, model, tokenizer)


def read_query_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_inputs(inputs: BenchInputs, window: int, n_queries: int) -> tuple[list[TokenWindow], list[TokenWindow]]:
    """Windows of the corpus and encoded queries, exactly as the pipeline's workers make them."""
    tok = inputs.tokenizer
    tokenisation = resolve_tokenisation(tok, None, None)  # the attribution job's default (corpus.add_bos/add_eos)
    windows, _ = encode_documents(tok, inputs.docs, window, tokenisation)
    rows = read_query_rows(inputs.queries_paths[n_queries])
    queries = [encode_query(tok, r["id"], r["prompt"], r["completion"], window, tokenisation) for r in rows]
    return windows, queries
