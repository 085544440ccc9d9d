"""Speed and memory of the attribution pipeline, measured side by side in one run.

``run_benchmark(BenchmarkConfig(...))`` measures, on one model, corpus and
machine, and writes ``{storage.root}/benchmarks/{name}.json``:

1. **ceiling**: plain forward + backward tokens/s (summed loss, every
   parameter requires grad, no hooks) on the same batches and window.
2. **score**: training tokens/s of ``InfluenceEngine.score_batch`` with
   precomputed query gradients, at the default projection and at ``dim=0``;
   ratio to the ceiling.
3. **vs kronfluence**: wall time of kronfluence's EK-FAC fit + pairwise scores
   against ours (fit + precondition + score + merge through
   ``pipeline.run.run_attribution`` on a local Ray; the in-process core when
   Ray is not importable, labelled so) at each query count, and the top-k
   overlap of the two rankings.
4. **memory**: peak RSS of one scoring worker process (``ShardWorker``) over
   a corpus of N and of 10N documents.
5. **merge**: rows/s of ``pipeline.merge.merge_shard_tables`` on synthetic
   shard results (10 million rows by default).
6. **scaling**: scoring throughput of the pipeline with 1 and 2 Ray workers.

Timings: ``warmup`` untimed passes, then ``repeats`` timed ones; the median
is reported with the number of repeats. End-to-end runs (3, 6) take
``pipeline_repeats`` runs each. A section that cannot run here (kronfluence
or Ray not installed) is ``null`` with the reason under ``notes``; nothing
is estimated. The corpus and queries come from the demo build
(``pipeline.demo``): its documents are cycled under new ids to reach N.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import metrics
from pipeline.config import AttributeConfig, StorageConfig, store_schema, to_typed
from pipeline.core.forward import sequence_losses
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import Batch, collate, encode_documents, encode_query
from pipeline.core.topk import TopK
from pipeline.evaluate import DemoWorldConfig, clean_json, machine_info, new_gpt2, resolve_device, torch_threads

log = logging.getLogger(__name__)

PRESETS = {
    # The demo's trained tiny GPT-2 (2 x 128 by default).
    "demo": None,
    # GPT-2 small's architecture (12 layers x 768, 12 heads), random init, with the demo tokenizer.
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}


@dataclass
class BenchModelConfig:
    # demo | gpt2-small (see PRESETS); ignored when path is set.
    preset: str = "demo"
    # A Hugging Face model directory with safetensors weights (local); empty: the preset.
    path: str = ""


@dataclass
class MemoryConfig:
    enabled: bool = True
    # Corpus sizes N and 10 N (documents) scored by one worker process each.
    n_docs: int = 128
    factor: int = 10
    docs_per_shard: int = 64


@dataclass
class MergeConfig:
    enabled: bool = True
    # Rows of synthetic shard results merged (10 million for the published figure).
    rows: int = 10_000_000
    queries: int = 100
    top_k: int = 50


@dataclass
class BenchmarkConfig:
    # The result is written to {storage.root}/benchmarks/{name}.json.
    name: str = "default"
    storage: StorageConfig = field(default_factory=StorageConfig)
    # auto: cuda if available, else cpu.
    device: str = "auto"
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    demo: DemoWorldConfig = field(default_factory=DemoWorldConfig)
    # Corpus size N in documents (demo documents cycled under new ids).
    n_docs: int = 256
    # Demo texts joined into one benchmark document (raise it with long windows so windows fill up).
    texts_per_doc: int = 1
    window: int = 64
    batch_size: int = 8
    # Batches timed in the ceiling and score measurements; queries scored there.
    throughput_batches: int = 16
    throughput_queries: int = 10
    warmup: int = 1
    repeats: int = 3
    # Query counts of the comparison with kronfluence.
    query_counts: list = field(default_factory=lambda: [10, 100])
    kronfluence: bool = True
    # Also time ours with projection off (dim 0) in the kronfluence comparison.
    compare_dim0: bool = True
    # Runs per end-to-end measurement (median).
    pipeline_repeats: int = 1
    # auto: the Ray pipeline (run_attribution) when Ray is importable, else the in-process core.
    ours: str = "auto"
    # Documents per shard in the pipeline runs (several shards per worker, so workers share the corpus).
    docs_per_shard: int = 32
    # Ray workers compared in the scaling measurement.
    scaling_workers: list = field(default_factory=lambda: [1, 2])
    scaling: bool = True
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    top_k: int = 10
    # torch intra-op threads of the driver (0: torch's default); the memory worker gets the same.
    threads: int = 0
    # Scratch folder for corpora, models and pipeline runs (removed at the end); empty: the system temp.
    work_dir: str = ""

    def validate(self) -> None:
        from pipeline.layout import validate_name

        validate_name(self.name, "name")
        if not self.model.path and self.model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.model.preset!r}")
        if self.ours not in ("auto", "pipeline", "core"):
            raise ValueError(f"ours must be auto, pipeline or core, got {self.ours!r}")
        checks = [
            (self.n_docs >= 1 and self.texts_per_doc >= 1, "n_docs and texts_per_doc must be >= 1"),
            (self.window >= 8, "window must be >= 8"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.throughput_batches >= 1, "throughput_batches must be >= 1"),
            (self.repeats >= 1 and self.warmup >= 0, "repeats must be >= 1 and warmup >= 0"),
            (self.pipeline_repeats >= 1, "pipeline_repeats must be >= 1"),
            (all(int(q) >= 1 for q in self.query_counts), "query_counts must be >= 1"),
            (self.memory.n_docs >= 1 and self.memory.factor >= 2, "memory.n_docs >= 1 and memory.factor >= 2"),
            (self.merge.rows >= 1 and self.merge.queries >= 1 and self.merge.top_k >= 1, "merge sizes must be >= 1"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.docs_per_shard >= 1, "docs_per_shard must be >= 1"),
            (self.threads >= 0, "threads must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def projection(self) -> ProjectionSpec:
        p = AttributeConfig().projection
        return ProjectionSpec(p.dim, p.seed, p.mode)

    def influence(self, dim: int | None = None) -> InfluenceConfig:
        """The attribution job's default EK-FAC; ``dim`` overrides the projection dimension."""
        d = AttributeConfig()
        spec = self.projection()
        if dim is not None:
            spec = ProjectionSpec(dim, spec.seed, spec.mode)
        return InfluenceConfig(projection=spec, damping=d.factors.damping, empirical_fisher=d.factors.empirical_fisher)


def register_configs() -> None:
    """Register ``BenchmarkConfig`` as ``benchmark_schema`` (its YAML in conf/ is validated against it)."""
    store_schema("benchmark_schema", BenchmarkConfig, mandatory=("storage.root",))


def to_config(cfg) -> BenchmarkConfig:
    """An OmegaConf config (from Hydra) to a validated ``BenchmarkConfig``."""
    return to_typed(BenchmarkConfig, cfg)


# ---- timing ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_median(fn, warmup: int, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
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


# ---- inputs ------------------------------------------------------------------------------


@dataclass
class BenchInputs:
    model_dir: str
    corpus_path: str
    docs: list[tuple[str, str]]
    queries_paths: dict[int, str]
    model: Any
    tokenizer: Any


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
    from pipeline.demo import build_demo
    from pipeline.model_io import load_model_and_tokenizer

    demo = build_demo(cfg.demo.cache_dir, cfg.demo.spec())
    texts = pq.read_table(demo.corpus_path, columns=["text"]).column(0).to_pylist()
    corpus_path = os.path.join(work, f"corpus-{cfg.n_docs}.parquet")
    docs = write_corpus(corpus_path, texts, cfg.n_docs, cfg.texts_per_doc)
    queries_paths = {}
    for q in sorted({int(x) for x in [*cfg.query_counts, cfg.throughput_queries]}):
        queries_paths[q] = os.path.join(work, f"queries-{q}.jsonl")
        write_queries(queries_paths[q], texts, q)
    if cfg.model.path:
        model_dir = cfg.model.path
    elif cfg.model.preset == "demo":
        model_dir = demo.model_dir
    else:
        preset = PRESETS[cfg.model.preset]
        _, tok = load_model_and_tokenizer(demo.model_dir)
        model = new_gpt2(len(tok), preset["n_embd"], preset["n_layer"], preset["n_head"],
                         max(preset["n_positions"], cfg.window), 0, tok.eos_token_id, tok.pad_token_id)
        model_dir = os.path.join(work, f"model-{cfg.model.preset}")
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    return BenchInputs(model_dir, corpus_path, docs, queries_paths, model, tokenizer)


def read_query_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_inputs(inputs: BenchInputs, window: int, n_queries: int):
    """Windows of the corpus and encoded queries, exactly as the pipeline's workers make them."""
    tok = inputs.tokenizer
    windows, _ = encode_documents(tok, inputs.docs, window)
    rows = read_query_rows(inputs.queries_paths[n_queries])
    queries = [encode_query(tok, r["id"], r["prompt"], r["completion"], window) for r in rows]
    return windows, queries


def batches_of(seqs, size: int, pad_id: int) -> list[Batch]:
    return [collate(seqs[i : i + size], pad_id) for i in range(0, len(seqs), size)]


# ---- 1 and 2: ceiling and score throughput ------------------------------------------------


def throughput(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device) -> dict:
    """Tokens/s of plain forward+backward vs our scoring, on the same batches."""
    pad = inputs.tokenizer.pad_token_id
    windows, queries = encode_inputs(inputs, cfg.window, cfg.throughput_queries)
    windows = windows[: cfg.throughput_batches * cfg.batch_size]
    batches = [b.to(device) for b in batches_of(windows, cfg.batch_size, pad)]
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))

    model = copy.deepcopy(inputs.model).to(device).eval()
    model.requires_grad_(True)

    def ceiling_pass():
        for batch in batches:
            model.zero_grad(set_to_none=True)
            sequence_losses(model, batch).sum().backward()

    ceiling_s, ceiling_runs = timed_median(ceiling_pass, cfg.warmup, cfg.repeats, device)
    del model
    result = {"tokens_per_pass": tokens, "batches": len(batches), "batch_size": cfg.batch_size,
              "window": cfg.window, "queries": len(queries), "repeats": cfg.repeats, "warmup": cfg.warmup,
              "ceiling_tokens_per_s": tokens / ceiling_s, "ceiling_runs_s": ceiling_runs, "score": {}}
    default_dim = cfg.projection().dim
    for dim in dict.fromkeys([default_dim, 0]):
        engine = InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(dim), device)
        factors = engine.fit(batches[: min(2, len(batches))])  # any factors do for timing
        q = engine.query_gradients(batches_of(queries, cfg.batch_size, pad), factors, [s.doc_id for s in queries])

        def score_pass(engine=engine, q=q):
            for batch in batches:
                engine.score_batch(batch, q)

        seconds, runs = timed_median(score_pass, cfg.warmup, cfg.repeats, device)
        result["score"][f"dim={dim}"] = {"projection": engine.config.projection.to_json(),
                                         "tokens_per_s": tokens / seconds, "runs_s": runs,
                                         "ratio_to_ceiling": (tokens / seconds) / result["ceiling_tokens_per_s"]}
        del engine
    return result


# ---- 3: against kronfluence ---------------------------------------------------------------


def _ray_available() -> tuple[bool, str]:
    try:
        import ray  # noqa: F401
        import pipeline.run  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"Ray pipeline not importable here ({type(exc).__name__}: {exc})"
    return True, ""


def attribute_config(cfg: BenchmarkConfig, inputs: BenchInputs, n_queries: int, root: str, run_id: str,
                     dim: int | None, num_workers: int, device: torch.device) -> AttributeConfig:
    """The attribution job's defaults pointed at the benchmark's model, corpus and queries."""
    a = AttributeConfig()
    a.model.path, a.corpus.path, a.queries.path = inputs.model_dir, inputs.corpus_path, inputs.queries_paths[n_queries]
    a.storage.root, a.run.id = root, run_id
    a.corpus.window = cfg.window
    a.corpus.docs_per_shard = cfg.docs_per_shard
    a.score.batch_size = a.factors.batch_size = cfg.batch_size
    a.score.top_k = cfg.top_k
    if dim is not None:
        a.projection.dim = dim
    a.cluster.num_workers = num_workers
    if device.type == "cuda":
        a.cluster.gpus_per_worker = 1.0 / num_workers
    return a


def ours_pipeline(cfg, inputs, n_queries, dim, work, tag, device, num_workers=None, corpus_path=None) -> dict:
    """One end-to-end ``run_attribution`` in fresh storage: wall seconds, stage timings, top-k per query."""
    import pyarrow.dataset as ds

    from pipeline.run import run_attribution

    root = tempfile.mkdtemp(prefix=f"run-{tag}-", dir=work)
    a = attribute_config(cfg, inputs, n_queries, root, f"bench-{tag}", dim,
                         num_workers or AttributeConfig().cluster.num_workers, device)
    if corpus_path:
        a.corpus.path = corpus_path
    started = time.perf_counter()
    manifest = run_attribution(a)
    seconds = time.perf_counter() - started
    table = ds.dataset(manifest["attribution"], format="parquet").to_table()
    topk: dict[str, set] = {}
    for row in table.to_pylist():
        if row["polarity"] == "proponent" and row["rank"] <= cfg.top_k:
            topk.setdefault(row["query_id"], set()).add((row["doc_id"], row["window"]))
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds, "timings": manifest.get("timings", {}), "counts": manifest.get("counts", {}),
            "topk": topk, "num_workers": a.cluster.num_workers}


def ours_core(cfg, inputs, n_queries, dim, device) -> dict:
    """The in-process core: fit + precondition + score every window + running top-k (no Ray, no I/O)."""
    pad = inputs.tokenizer.pad_token_id
    started = time.perf_counter()
    windows, queries = encode_inputs(inputs, cfg.window, n_queries)
    engine = InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(dim), device)
    batches = batches_of(windows, cfg.batch_size, pad)
    factors = engine.fit(batches)
    fitted = time.perf_counter()
    q = engine.query_gradients(batches_of(queries, cfg.batch_size, pad), factors, [s.doc_id for s in queries])
    preconditioned = time.perf_counter()
    acc = TopK(len(queries), cfg.top_k)
    for i, batch in enumerate(batches):
        keys = torch.arange(i * cfg.batch_size, i * cfg.batch_size + batch.input_ids.shape[0])
        acc.update(engine.score_batch(batch, q), keys)
    scored = time.perf_counter()
    topk = {s.doc_id: {(windows[k].doc_id, windows[k].window) for _, k in acc.proponents(i)}
            for i, s in enumerate(queries)}
    return {"seconds": scored - started,
            "timings": {"fit_s": fitted - started, "precondition_s": preconditioned - fitted, "score_s": scored - preconditioned},
            "counts": {"num_windows": len(windows)}, "topk": topk}


def versus_kronfluence(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str, notes: dict) -> dict:
    from pipeline.baselines import kronfluence_available, kronfluence_pairwise

    mode = cfg.ours
    if mode in ("auto", "pipeline"):
        ok, reason = _ray_available()
        if not ok and mode == "pipeline":
            raise RuntimeError(reason)
        if not ok:
            notes["ours"] = f"ours measured with the in-process core: {reason}"
        mode = "pipeline" if ok else "core"
    label = ("pipeline: run_attribution on a local Ray (validate, start workers, fit, precondition, score, merge)"
             if mode == "pipeline" else "in-process core: fit + precondition + score + top-k, no Ray and no I/O")
    kron_ok, kron_reason = kronfluence_available() if cfg.kronfluence else (False, "disabled by config")
    if not kron_ok:
        notes["kronfluence"] = kron_reason
    default_dim = cfg.projection().dim
    dims = list(dict.fromkeys([default_dim] + ([0] if cfg.compare_dim0 else [])))
    out: dict[str, Any] = {"ours_method": label, "pipeline_repeats": cfg.pipeline_repeats, "by_queries": {}}
    pad = inputs.tokenizer.pad_token_id
    if cfg.warmup > 0:
        # Untimed small runs of both first: imports, library initialisation and caches are not counted.
        started = time.perf_counter()
        small_corpus = os.path.join(work, "warmup-corpus.parquet")
        write_corpus(small_corpus, [t for _, t in inputs.docs], min(cfg.n_docs, 2 * cfg.batch_size))
        if mode == "pipeline":
            ours_pipeline(cfg, inputs, cfg.throughput_queries, None, work, "warmup", device, corpus_path=small_corpus)
        if kron_ok:
            windows, queries = encode_inputs(inputs, cfg.window, cfg.throughput_queries)
            layers = list(InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(0), "cpu").layers)
            kronfluence_pairwise(inputs.model, layers, windows[: 2 * cfg.batch_size], queries[:1], pad,
                                 device=str(device), train_batch_size=cfg.batch_size, query_batch_size=1)
        out["warmup_s"] = time.perf_counter() - started
    for n_queries in [int(q) for q in cfg.query_counts]:
        point: dict[str, Any] = {"ours": {}}
        for dim in dims:
            runs = []
            for r in range(cfg.pipeline_repeats):
                tag = f"q{n_queries}-d{dim}-r{r}"
                runs.append(ours_pipeline(cfg, inputs, n_queries, dim, work, tag, device) if mode == "pipeline"
                            else ours_core(cfg, inputs, n_queries, dim, device))
            point["ours"][f"dim={dim}"] = {
                "seconds": statistics.median(r["seconds"] for r in runs), "runs_s": [r["seconds"] for r in runs],
                "stage_timings": runs[-1]["timings"], "num_windows": runs[-1]["counts"].get("num_windows"),
                "_topk": runs[-1]["topk"],
            }
        if kron_ok:
            windows, queries = encode_inputs(inputs, cfg.window, n_queries)
            layers = list(InfluenceEngine(copy.deepcopy(inputs.model), cfg.influence(0), "cpu").layers)
            kruns, scores = [], None
            for _ in range(cfg.pipeline_repeats):
                started = time.perf_counter()
                scores, parts = kronfluence_pairwise(
                    inputs.model, layers, windows, queries, pad, damping=AttributeConfig().factors.damping,
                    empirical_fisher=AttributeConfig().factors.empirical_fisher, precision="float32",
                    device=str(device), train_batch_size=cfg.batch_size, query_batch_size=min(n_queries, 32))
                kruns.append((time.perf_counter() - started, parts))
            point["kronfluence"] = {"seconds": statistics.median(k[0] for k in kruns), "runs_s": [k[0] for k in kruns],
                                    "fit_s": kruns[-1][1]["fit_s"], "score_s": kruns[-1][1]["score_s"]}
            theirs = {}
            for qi, query in enumerate(queries):
                order = metrics.rank_order(scores[qi].numpy())[: cfg.top_k]
                theirs[query.doc_id] = {(windows[i].doc_id, windows[i].window) for i in order if scores[qi, i] > 0}
            for name, ours in point["ours"].items():
                overlaps = [len(ours["_topk"].get(qid, set()) & top) / cfg.top_k for qid, top in theirs.items()]
                ours["topk_overlap_vs_kronfluence"] = float(np.mean(overlaps))
                ours["speedup_vs_kronfluence"] = point["kronfluence"]["seconds"] / ours["seconds"]
        for ours in point["ours"].values():
            ours.pop("_topk")
        out["by_queries"][str(n_queries)] = point
    out["dims"] = dims
    return out


# ---- 4: memory of one scoring worker ------------------------------------------------------


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_worker_main(args: dict) -> dict:
    """In a fresh process: one ``ShardWorker`` scores every shard of a corpus; its peak RSS."""
    from pipeline.corpus import list_corpus, make_shards
    from pipeline import layout
    from pipeline.storage import Storage
    from pipeline.worker import ShardWorker, WorkerSpec

    spec = ProjectionSpec(**args["projection"])
    influence = InfluenceConfig(projection=spec, damping=args["damping"], empirical_fisher=args["empirical_fisher"])
    worker = ShardWorker(WorkerSpec(
        model_path=args["model_path"], model_cache_dir=args["cache_dir"], trust_remote_code=False,
        influence=influence, id_column="id", text_column="text", window_len=args["window"],
        fit_batch_size=args["batch_size"], score_batch_size=args["batch_size"], storage_root=args["root"],
        device=args["device"],
    ))
    after_load = _maxrss_mib()
    storage = Storage(args["root"])
    shards = make_shards(list_corpus(args["corpus_path"], "id", "text"), args["docs_per_shard"])
    started, windows = time.perf_counter(), 0
    for shard in shards:
        info = worker.score(shard, args["queries_url"], layout.shard_result(storage.root, args["run_id"], shard.shard_id), args["top_k"])
        windows += info.num_windows
    return {"peak_rss_mib": _maxrss_mib(), "rss_after_load_mib": after_load, "num_shards": len(shards),
            "num_windows": windows, "seconds": time.perf_counter() - started}


def memory(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str) -> dict:
    """Peak RSS of a scoring worker process at N and ``factor`` x N documents."""
    from pipeline import layout
    from pipeline.storage import Storage

    texts = [t for _, t in inputs.docs]
    pad = inputs.tokenizer.pad_token_id
    influence = cfg.influence()
    windows, queries = encode_inputs(inputs, cfg.window, cfg.throughput_queries)
    engine = InfluenceEngine(copy.deepcopy(inputs.model), influence, device)
    factors = engine.fit(batches_of(windows[: 4 * cfg.batch_size], cfg.batch_size, pad))
    q = engine.query_gradients(batches_of(queries, cfg.batch_size, pad), factors, [s.doc_id for s in queries])
    root = os.path.join(work, "memory")
    storage = Storage(root)
    queries_url = layout.query_gradients(storage.root, "bench")
    storage.write_safetensors(queries_url, q.to_tensors(), {"query_ids": "\n".join(q.query_ids)})
    del engine
    env = dict(os.environ)
    if cfg.threads > 0:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = {"docs_per_shard": cfg.memory.docs_per_shard, "queries": len(queries), "device": str(device),
           "measure": "the worker process's own getrusage(RUSAGE_SELF).ru_maxrss at exit", "runs": {}}
    for n in (cfg.memory.n_docs, cfg.memory.n_docs * cfg.memory.factor):
        corpus = os.path.join(work, f"memory-corpus-{n}.parquet")
        write_corpus(corpus, texts, n)
        args = {"model_path": inputs.model_dir, "cache_dir": os.path.join(work, "model-cache"),
                "projection": influence.projection.to_json(), "damping": influence.damping,
                "empirical_fisher": influence.empirical_fisher, "window": cfg.window, "batch_size": cfg.batch_size,
                "root": root, "corpus_path": corpus, "docs_per_shard": cfg.memory.docs_per_shard,
                "queries_url": queries_url, "run_id": f"memory-{n}", "top_k": cfg.top_k, "device": str(device)}
        proc = subprocess.run([sys.executable, "-m", "pipeline.benchmark", "--rss-worker", json.dumps(args)],
                              env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {n} documents failed:\n{proc.stderr[-3000:]}")
        out["runs"][str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = (out["runs"][str(n)] for n in (cfg.memory.n_docs, cfg.memory.n_docs * cfg.memory.factor))
    out["rss_ratio"] = large["peak_rss_mib"] / small["peak_rss_mib"]
    out["factor"] = cfg.memory.factor
    return out


# ---- 5: merge ----------------------------------------------------------------------------


def synthetic_shard_tables(rows: int, queries: int, top_k: int, seed: int = 0) -> list[pa.Table]:
    """Shard results as workers write them: per shard, ``top_k`` proponents and opponents per query."""
    from pipeline.worker import SHARD_SCHEMA

    per_shard = queries * 2 * top_k
    n_shards = max(1, math.ceil(rows / per_shard))
    rng = np.random.default_rng(seed)
    query_ids = np.repeat(np.array([f"q{i:05d}" for i in range(queries)]), 2 * top_k)
    polarity = np.tile(np.repeat(np.array(["proponent", "opponent"]), top_k), queries)
    rank = np.tile(np.arange(1, top_k + 1, dtype=np.int32), 2 * queries)
    sign = np.where(polarity == "proponent", 1.0, -1.0)
    tables = []
    for s in range(n_shards):
        local = rng.integers(0, 1 << 20, per_shard)
        tables.append(pa.table({
            "query_id": pa.array(query_ids), "polarity": pa.array(polarity), "rank": pa.array(rank),
            "doc_id": pa.array(np.char.add(f"doc-{s:06d}-", local.astype(str))),
            "window": pa.array(rng.integers(0, 4, per_shard, dtype=np.int32)),
            "score": pa.array(sign * rng.exponential(1.0, per_shard)),
            "seq_key": pa.array((np.int64(s) << 32) | local.astype(np.int64)),
        }, schema=SHARD_SCHEMA))
    return tables


def merge_benchmark(cfg: BenchmarkConfig, notes: dict) -> dict | None:
    try:
        from pipeline.merge import merge_shard_tables
        import pipeline.worker  # noqa: F401 - the shard schema
    except Exception as exc:  # noqa: BLE001
        notes["merge"] = f"pipeline.merge.merge_shard_tables not importable here ({type(exc).__name__}: {exc})"
        return None
    started = time.perf_counter()
    tables = synthetic_shard_tables(cfg.merge.rows, cfg.merge.queries, cfg.merge.top_k)
    built = time.perf_counter() - started
    rows = sum(t.num_rows for t in tables)
    merge_shard_tables(tables[:2], cfg.merge.top_k)  # warm-up (duckdb start)
    result: dict = {}

    def run():
        result["table"] = merge_shard_tables(tables, cfg.merge.top_k)

    seconds, runs = timed_median(run, 0, cfg.repeats, torch.device("cpu"))
    expected = cfg.merge.queries * 2 * cfg.merge.top_k
    if result["table"].num_rows != expected:
        raise RuntimeError(f"merge returned {result['table'].num_rows} rows, expected {expected}")
    return {"rows": rows, "shards": len(tables), "queries": cfg.merge.queries, "top_k": cfg.merge.top_k,
            "seconds": seconds, "runs_s": runs, "repeats": cfg.repeats, "rows_per_s": rows / seconds,
            "build_inputs_s": built}


# ---- 6: scaling --------------------------------------------------------------------------


def scaling(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str, notes: dict) -> dict | None:
    ok, reason = _ray_available()
    if not ok:
        notes["scaling"] = reason
        return None
    n_queries = int(cfg.query_counts[0])
    out = {"queries": n_queries, "pipeline_repeats": cfg.pipeline_repeats, "by_workers": {}}
    for workers in [int(w) for w in cfg.scaling_workers]:
        runs = [ours_pipeline(cfg, inputs, n_queries, None, work, f"scale-w{workers}-r{r}", device, workers)
                for r in range(cfg.pipeline_repeats)]
        score_s = statistics.median(r["timings"]["score_s"] for r in runs)
        windows = runs[-1]["counts"].get("num_windows", 0)
        out["by_workers"][str(workers)] = {
            "score_s": score_s, "score_windows_per_s": windows / score_s if score_s else None,
            "end_to_end_s": statistics.median(r["seconds"] for r in runs), "num_windows": windows,
            "stage_timings": runs[-1]["timings"],
        }
    return out


# ---- the job ------------------------------------------------------------------------------


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Every measurement; writes ``{storage.root}/benchmarks/{cfg.name}.json`` and returns it."""
    cfg.validate()
    with torch_threads(cfg.threads):
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchmarkConfig) -> dict:
    from pipeline import layout
    from pipeline.storage import Storage

    storage = Storage(cfg.storage.root, cfg.storage.options)
    storage.check_writable()
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    if cfg.work_dir:
        os.makedirs(cfg.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="benchmark-", dir=cfg.work_dir or None)
    notes: dict[str, str] = {}
    result: dict[str, Any] = {"name": cfg.name, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "machine": machine_info(), "device": str(device), "config": asdict(cfg), "notes": notes}
    result["config"]["storage"]["options"] = sorted(cfg.storage.options)
    try:
        inputs = prepare_inputs(cfg, work)
        n_params = sum(p.numel() for p in inputs.model.parameters())
        result["model"] = {"dir": inputs.model_dir, "preset": cfg.model.preset if not cfg.model.path else None,
                           "parameters": n_params, "config": {k: getattr(inputs.model.config, k, None)
                                                              for k in ("n_layer", "n_embd", "n_head", "vocab_size")}}
        result["corpus"] = {"n_docs": cfg.n_docs, "window": cfg.window, "texts_per_doc": cfg.texts_per_doc}
        result["projection_default"] = cfg.projection().to_json()
        log.info("benchmark %r: %d-parameter model on %s", cfg.name, n_params, device)

        log.info("1-2: ceiling and score throughput")
        tp = throughput(cfg, inputs, device)
        result["throughput"] = tp
        default_key = f"dim={cfg.projection().dim}"
        result["ceiling_tokens_per_s"] = tp["ceiling_tokens_per_s"]
        result["score_tokens_per_s"] = tp["score"][default_key]["tokens_per_s"]
        result["score_to_ceiling_ratio"] = tp["score"][default_key]["ratio_to_ceiling"]
        result["score_tokens_per_s_dim0"] = tp["score"]["dim=0"]["tokens_per_s"]
        result["score_to_ceiling_ratio_dim0"] = tp["score"]["dim=0"]["ratio_to_ceiling"]

        log.info("3: against kronfluence")
        vk = versus_kronfluence(cfg, inputs, device, work, notes)
        result["versus_kronfluence"] = vk
        by_q = vk["by_queries"]

        def per_q(fn):
            return {q: fn(p) for q, p in by_q.items()}

        result["ours_seconds"] = per_q(lambda p: p["ours"][default_key]["seconds"])
        result["kronfluence_seconds"] = per_q(lambda p: p.get("kronfluence", {}).get("seconds"))
        result["speedup_vs_kronfluence"] = per_q(lambda p: p["ours"][default_key].get("speedup_vs_kronfluence"))
        result["topk_overlap_vs_kronfluence"] = per_q(lambda p: p["ours"][default_key].get("topk_overlap_vs_kronfluence"))
        if "dim=0" in next(iter(by_q.values()))["ours"]:
            result["topk_overlap_vs_kronfluence_dim0"] = per_q(
                lambda p: p["ours"]["dim=0"].get("topk_overlap_vs_kronfluence"))

        result["rss_ratio_10x"] = None
        if cfg.memory.enabled:
            log.info("4: memory of one scoring worker")
            mem = memory(cfg, inputs, device, work)
            result["memory"] = mem
            result["rss_ratio_10x"] = mem["rss_ratio"]
        else:
            notes["memory"] = "disabled by config"

        result["merge_rows_per_s"] = None
        if cfg.merge.enabled:
            log.info("5: merge of %d synthetic shard rows", cfg.merge.rows)
            mg = merge_benchmark(cfg, notes)
            result["merge"] = mg
            result["merge_rows_per_s"] = mg["rows_per_s"] if mg else None
        else:
            notes["merge"] = "disabled by config"

        result["scaling_2_workers"] = None
        if cfg.scaling:
            log.info("6: scaling over Ray workers %s", cfg.scaling_workers)
            sc = scaling(cfg, inputs, device, work, notes)
            result["scaling"] = sc
            if sc and "1" in sc["by_workers"] and "2" in sc["by_workers"]:
                one, two = sc["by_workers"]["1"]["score_windows_per_s"], sc["by_workers"]["2"]["score_windows_per_s"]
                result["scaling_2_workers"] = two / one if one and two else None
        else:
            notes["scaling"] = "disabled by config"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds_total"] = time.perf_counter() - started
    result = clean_json(result)
    url = layout.benchmark_result(storage.root, cfg.name)
    storage.write_json(url, result)
    log.info("benchmark written to %s (%.1f s)", url, result["seconds_total"])
    result["url"] = url
    return result


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"
    return str(x)


def format_report(result: dict) -> str:
    """The headline figures as a plain-text table."""
    m = result["machine"]
    lines = [f"benchmark {result['name']} on {result['device']} ({m['cpu_count']} CPUs {m['cpu_model']}, "
             f"GPU {m['gpu']}, torch {m['torch']}, load {m.get('load_average_1m')})"]
    if "model" in result:
        lines.append(f"model: {result['model']['parameters']:,} parameters {result['model']['config']}; "
                     f"N = {result['corpus']['n_docs']} documents, window {result['corpus']['window']}; "
                     f"default projection {result['projection_default']}")
    tp = result.get("throughput", {})
    rows = [("ceiling fwd+bwd tokens/s", result.get("ceiling_tokens_per_s")),
            ("score tokens/s (default projection)", result.get("score_tokens_per_s")),
            ("  ratio to ceiling", result.get("score_to_ceiling_ratio")),
            ("score tokens/s (dim=0)", result.get("score_tokens_per_s_dim0")),
            ("  ratio to ceiling", result.get("score_to_ceiling_ratio_dim0"))]
    for q in result.get("ours_seconds", {}):
        rows += [(f"{q} queries: ours s", result["ours_seconds"][q]),
                 (f"{q} queries: kronfluence s", result["kronfluence_seconds"].get(q)),
                 (f"{q} queries: speedup vs kronfluence", result["speedup_vs_kronfluence"].get(q)),
                 (f"{q} queries: top-k overlap vs kronfluence", result["topk_overlap_vs_kronfluence"].get(q))]
        if "topk_overlap_vs_kronfluence_dim0" in result:
            rows.append((f"{q} queries: top-k overlap (dim=0)", result["topk_overlap_vs_kronfluence_dim0"].get(q)))
    mem = result.get("memory")
    if mem:
        for n, run in mem["runs"].items():
            rows.append((f"worker peak RSS MiB at {n} docs", run["peak_rss_mib"]))
    rows += [("RSS ratio 10x corpus", result.get("rss_ratio_10x")),
             ("merge rows/s", result.get("merge_rows_per_s")),
             ("scaling 2 workers / 1", result.get("scaling_2_workers"))]
    width = max(len(r[0]) for r in rows)
    lines += [f"{name.ljust(width)}  {_fmt(value)}" for name, value in rows]
    if tp:
        lines.append(f"(throughput: median of {tp['repeats']} repeats after {tp['warmup']} warm-up; "
                     f"end-to-end: median of {result['config']['pipeline_repeats']} run(s))")
    for key, note in result.get("notes", {}).items():
        lines.append(f"note [{key}]: {note}")
    lines.append(f"total {result['seconds_total']:.1f} s; written to {result.get('url', '-')}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(rss_worker_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m pipeline.benchmark --rss-worker JSON (internal); run jobs/benchmark.py instead")
