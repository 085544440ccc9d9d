"""Merge throughput: rows/s of ``pipeline.merge.merge_shard_tables`` on synthetic shard results."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import torch

from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import timed_median
from pipeline.merge import merge_shard_tables
from pipeline.tables import CONTRACT_FIELDS

# The window rows' columns every shard result has: the contract's plus ``seq_key``, the merge's tie-break.
SHARD_SCHEMA = pa.schema([*CONTRACT_FIELDS, ("seq_key", pa.int64())])


def synthetic_shard_tables(rows: int, queries: int, top_k: int, seed: int = 0) -> list[pa.Table]:
    """Shard results as workers write them: per shard, ``top_k`` proponents and opponents per query."""
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


def merge_benchmark(cfg: BenchmarkConfig) -> dict:
    """Median seconds and rows/s of merging ``cfg.merge.rows`` synthetic rows into the final top-k table."""
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
