"""The gradient store's size and the time to answer a new query set from it, against a full scoring pass.

On the embedded demo (a tiny GPT-2, its corpus of planted facts and filler):

1. a full run (fit, precondition, score, merge) for the demo's queries with
   ``store.enabled=true`` writes the store (``store.dim``, ``store.dtype``);
2. a new query set (the demo's queries under new ids with other completions)
   is answered twice: from the store (``score.source=store``: Ray tasks, no
   model) and by a full scoring pass (``score.source=model``); the
   preconditioning of the new queries is shared (it runs once, first);
3. printed: the store's bytes per window and per token (its shard files as
   committed, and the gradient numbers alone), each stage's time, and how
   many of the full pass's top-10 proponents the store's top-10 keeps.

    python -m benchmarks.speed.store                       # store.dim=32, bfloat16
    python -m benchmarks.speed.store --dim 16 --dtype float16 --root /tmp/store-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace

from pipeline import layout
from pipeline.config import AttributeConfig, RunConfig, ScoreConfig, StorageConfig, StoreConfig
from pipeline.context import resolve_demo


def _stages(cfg: AttributeConfig, names: list[str]) -> tuple[dict, float]:
    from pipeline.run import run_stages

    started = time.perf_counter()
    ctx = run_stages(cfg, names)
    ctx.workers = []
    return ctx, time.perf_counter() - started


def _top10(root: str, run_id: str) -> dict[str, list[tuple[str, int]]]:
    import pyarrow.dataset as ds

    from pipeline.storage import Storage

    url = Storage(root).read_json(layout.run_manifest(root, run_id))["attribution"]
    rows = ds.dataset(url, format="parquet").to_table().to_pylist()
    out: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
        if r["polarity"] == "proponent" and r["rank"] <= 10:
            out.setdefault(r["query_id"], []).append((r["doc_id"], r["window"]))
    return out


def main(dim: int, dtype: str, root: str, cache_dir: str) -> dict:
    from pipeline.store import store_size

    base = AttributeConfig(storage=StorageConfig(root=root), store=StoreConfig(enabled=True, dim=dim, dtype=dtype),
                           score=replace(ScoreConfig(), top_k=10))
    base = resolve_demo(replace(base, demo=replace(base.demo, cache_dir=cache_dir)))
    queries = [json.loads(line) for line in open(base.queries.path) if line.strip()]
    new = [{"id": f"new-{q['id']}", "prompt": q["prompt"], "completion": q["completion"][::-1]} for q in queries]
    new_path = os.path.join(root, "new-queries.jsonl")
    os.makedirs(root, exist_ok=True)
    with open(new_path, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in new)

    figures: dict = {"store.dim": dim, "store.dtype": dtype}
    written, seconds = _stages(replace(base, run=RunConfig(id="write-store")), ["fit", "precondition", "score",
                                                                                  "merge"])
    figures["first_run_s"] = round(seconds, 1)
    figures["first_run_score_s"] = written.timings["score_s"]
    size = store_size(written.storage, written.counts.get("store_id") or _store_id(written))
    width = _width(written)
    number_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    figures.update(
        store_files=size.files, store_bytes=size.bytes, windows=size.windows, tokens=size.tokens,
        bytes_per_window=round(size.bytes / size.windows, 1), bytes_per_token=round(size.bytes / size.tokens, 1),
        gradient_bytes_per_window=width * number_bytes,
        gradient_bytes_per_token=round(width * number_bytes * size.windows / size.tokens, 1),
    )
    new_base = replace(base, queries=replace(base.queries, path=new_path))
    store_cfg = replace(new_base, run=RunConfig(id="new-from-store"), score=replace(new_base.score, source="store"))
    ctx, _ = _stages(store_cfg, ["precondition"])
    figures["new_queries_precondition_s"] = ctx.timings["precondition_s"]
    ctx, seconds = _stages(store_cfg, ["score", "merge"])
    figures.update(from_store_score_s=ctx.timings["score_s"], from_store_merge_s=ctx.timings["merge_s"],
                   from_store_job_s=round(seconds, 1))
    model_cfg = replace(new_base, run=RunConfig(id="new-full-pass"), store=replace(new_base.store, enabled=False))
    ctx, seconds = _stages(model_cfg, ["score", "merge"])
    figures.update(full_pass_score_s=ctx.timings["score_s"], full_pass_merge_s=ctx.timings["merge_s"],
                   full_pass_job_s=round(seconds, 1))
    figures["score_speedup"] = round(figures["full_pass_score_s"] / figures["from_store_score_s"], 2)
    exact, truncated = _top10(root, "new-full-pass"), _top10(root, "new-from-store")
    overlaps = [len(set(exact[q]) & set(truncated.get(q, []))) / max(1, len(exact[q])) for q in exact]
    figures["top10_overlap_with_full_pass"] = round(sum(overlaps) / len(overlaps), 3)
    figures["queries"] = len(new)
    return figures


def _store_id(ctx) -> str:
    from pipeline.store import store_key

    return store_key(ctx).id


def _width(ctx) -> int:
    import json as _json

    from pipeline.store import store_key

    shard = ctx.shards[0]
    _, meta = ctx.storage.read_safetensors(layout.store_shard(ctx.storage.root, store_key(ctx).id, shard.shard_id))
    return sum(o * i for _, o, i in _json.loads(meta["layers"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--root", default="", help="storage root (default: a fresh temporary folder, removed after)")
    parser.add_argument("--demo-cache", default="outputs/demo-cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or tempfile.mkdtemp(prefix="store-bench-")
    try:
        result = main(args.dim, args.dtype, os.path.abspath(root), args.demo_cache)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
