"""Memory of one scoring worker: peak RSS of a ``ShardWorker`` process over N and ``factor`` x N documents.

Each size is scored in a fresh process (``python -m benchmarks.speed.memory
--rss-worker JSON``) so that its ``ru_maxrss`` is its own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import subprocess
import sys
import time

import torch

from pipeline.core.text import batches_of
from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import BenchInputs, encode_inputs, write_corpus
from pipeline import layout
from pipeline.commit import commit_file
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.projection import ProjectionSpec
from pipeline.storage import Storage

# The repository root, put on the worker process's PYTHONPATH.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_worker_main(args: dict) -> dict:
    """In a fresh process: one ``ShardWorker`` scores every shard of a corpus; its peak RSS."""
    from pipeline.corpus import list_corpus, make_shards
    from pipeline.worker import ShardWorker, WorkerSpec

    spec = ProjectionSpec(**args["projection"])
    influence = InfluenceConfig(projection=spec, damping=args["damping"], empirical_fisher=args["empirical_fisher"],
                                query_rank=args.get("query_rank", 0))
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
        result_url = layout.shard_result(storage.root, args["run_id"], shard.shard_id)
        info = worker.score(shard, args["queries_url"], result_url, args["top_k"])
        windows += info.num_windows
    return {"peak_rss_mib": _maxrss_mib(), "rss_after_load_mib": after_load, "num_shards": len(shards),
            "num_windows": windows, "seconds": time.perf_counter() - started}


def memory(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str) -> dict:
    """Peak RSS of a scoring worker process at N and ``factor`` x N documents."""
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
    commit_file(storage, queries_url)  # workers read only committed, verified query gradients
    del engine
    env = dict(os.environ)
    if cfg.threads > 0:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = {"docs_per_shard": cfg.memory.docs_per_shard, "queries": len(queries), "device": str(device),
           "measure": "the worker process's own getrusage(RUSAGE_SELF).ru_maxrss at exit", "runs": {}}
    for n in (cfg.memory.n_docs, cfg.memory.n_docs * cfg.memory.factor):
        corpus = os.path.join(work, f"memory-corpus-{n}.parquet")
        write_corpus(corpus, texts, n)
        args = {"model_path": inputs.model_dir, "cache_dir": os.path.join(work, "model-cache"),
                "projection": influence.projection.to_json(), "damping": influence.damping,
                "empirical_fisher": influence.empirical_fisher, "query_rank": influence.query_rank, "window": cfg.window, "batch_size": cfg.batch_size,
                "root": root, "corpus_path": corpus, "docs_per_shard": cfg.memory.docs_per_shard,
                "queries_url": queries_url, "run_id": f"memory-{n}", "top_k": cfg.top_k, "device": str(device)}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.speed.memory", "--rss-worker", json.dumps(args)],
                              env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker for {n} documents failed:\n{proc.stderr[-3000:]}")
        out["runs"][str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, large = (out["runs"][str(n)] for n in (cfg.memory.n_docs, cfg.memory.n_docs * cfg.memory.factor))
    out["rss_ratio"] = large["peak_rss_mib"] / small["peak_rss_mib"]
    out["factor"] = cfg.memory.factor
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(rss_worker_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m benchmarks.speed.memory --rss-worker JSON (internal); run jobs/benchmark.py instead")
