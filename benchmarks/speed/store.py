"""The gradient store's size and the time to answer a new query set from it, against a full scoring pass.

On the embedded demo (a tiny GPT-2, its corpus of planted facts and filler), or
with ``--smollm2`` on the pretrained SmolLM2-135M and the planted-facts
recipe's documents (as the speed benchmark's ``model.preset=smollm2``):

1. a full run (fit, precondition, score, merge) for the demo's queries with
   ``store.enabled=true`` writes the store (``store.dim``, ``store.dtype``);
2. a new query set (the demo's queries under new ids with other completions)
   is answered twice: from the store (``score.source=store``: Ray tasks, no
   model) and by a full scoring pass (``score.source=model``); the
   preconditioning of the new queries is shared (it runs once, first);
3. two-stage (``store.rescore=m`` for each ``--rescore m``): the store's
   global top ``m`` per query and polarity, rescored exactly by the model;
4. printed: the store's bytes per window and per token (its shard files as
   committed, and the gradient numbers alone), each stage's time, and how
   many of the full pass's top-10 proponents the store's top-10 keeps; per
   ``m``: the recall of the full pass's top 10 inside the query's own
   proponent shortlist (the rescored set is larger: every query's and
   polarity's shortlist, and their documents' other windows), the
   share of windows the model rescored, the two-stage top-10 overlap with
   the full pass, and its score-stage time.

    python -m benchmarks.speed.store                       # store.dim=32, bfloat16, rescore 10 20 40
    python -m benchmarks.speed.store --dim 16 --dtype float16 --root /tmp/store-bench --rescore 10
    python -m benchmarks.speed.store --smollm2 --docs 128 --queries 16   # pretrained SmolLM2-135M, empirical Fisher
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


def _overlap(exact: dict, got: dict) -> float:
    overlaps = [len(set(exact[q]) & set(got.get(q, []))) / max(1, len(exact[q])) for q in exact]
    return round(sum(overlaps) / len(overlaps), 3)


def _shortlists(ctx, m: int) -> dict[str, set[tuple[str, int]]]:
    """Per query: the store's global top ``m`` proponent windows (from every shard's shortlist file)."""
    import pyarrow.parquet as pq

    from pipeline.store import shortlist_url

    rows: dict[str, list] = {}
    for shard in ctx.shards:
        for r in pq.read_table(shortlist_url(ctx, shard)).to_pylist():
            if r["kind"] == "window" and r["polarity"] == "proponent":
                rows.setdefault(r["query_id"], []).append((-r["score"], shard.index, r["seq_key"] & 0xFFFFFFFF,
                                                           (r["doc_id"], r["window"])))
    return {q: {w for *_, w in sorted(found)[:m]} for q, found in rows.items()}


def _demo_inputs(base: AttributeConfig, root: str, cache_dir: str) -> tuple[AttributeConfig, str]:
    """The embedded demo; new queries: the demo's prompts under new ids with other (reversed) completions."""
    base = resolve_demo(replace(base, demo=replace(base.demo, cache_dir=cache_dir)))
    queries = [json.loads(line) for line in open(base.queries.path) if line.strip()]
    new = [{"id": f"new-{q['id']}", "prompt": q["prompt"], "completion": q["completion"][::-1]} for q in queries]
    new_path = os.path.join(root, "new-queries.jsonl")
    with open(new_path, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in new)
    return base, new_path


def _smollm2_inputs(base: AttributeConfig, root: str, n_docs: int, n_queries: int, window: int,
                    docs_per_shard: int) -> tuple[AttributeConfig, str]:
    """Pretrained SmolLM2-135M on the planted-facts recipe's documents cycled to ``n_docs`` (as the speed
    benchmark's ``model.preset=smollm2``); queries from corpus text, the new set from the second half of it."""
    from benchmarks.smollm2_facts import FactsSpec, make_corpus
    from benchmarks.speed.inputs import write_corpus, write_queries
    from pipeline.config import CorpusConfig, FactorsConfig, ModelConfig, QueriesConfig
    from pipeline.model_io import load_model_and_tokenizer
    from pipeline.pretrained import DEFAULT_CACHE_DIR, build_smollm2

    model_dir = build_smollm2(DEFAULT_CACHE_DIR)
    _, tok = load_model_and_tokenizer(model_dir)
    texts = [d["text"] for d in make_corpus(FactsSpec(), tok)[0]]
    corpus = os.path.join(root, "corpus.parquet")
    write_corpus(corpus, texts, n_docs)
    first, new_path = os.path.join(root, "queries.jsonl"), os.path.join(root, "new-queries.jsonl")
    write_queries(first, texts, n_queries)
    write_queries(new_path, texts[len(texts) // 2:], n_queries)
    rows = [json.loads(line) for line in open(new_path)]
    with open(new_path, "w") as f:
        f.writelines(json.dumps({**r, "id": "new-" + r["id"]}) + "\n" for r in rows)
    base = replace(base, model=ModelConfig(path=model_dir), queries=QueriesConfig(path=first),
                   corpus=CorpusConfig(path=corpus, window=window, docs_per_shard=docs_per_shard),
                   factors=FactorsConfig(empirical_fisher=True))
    return base, new_path


def main(dim: int, dtype: str, root: str, cache_dir: str, rescore: list[int], smollm2: bool = False,
         n_docs: int = 128, n_queries: int = 16, window: int = 128, docs_per_shard: int = 64) -> dict:
    from pipeline.store import store_size

    base = AttributeConfig(storage=StorageConfig(root=root), store=StoreConfig(enabled=True, dim=dim, dtype=dtype),
                           score=replace(ScoreConfig(), top_k=10))
    os.makedirs(root, exist_ok=True)
    if smollm2:
        base, new_path = _smollm2_inputs(base, root, n_docs, n_queries, window, docs_per_shard)
    else:
        base, new_path = _demo_inputs(base, root, cache_dir)
    new = [line for line in open(new_path) if line.strip()]

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
    figures["top10_overlap_with_full_pass"] = _overlap(exact, truncated)
    figures["queries"] = len(new)
    for m in rescore:
        run_id = f"two-stage-{m}"
        cfg = replace(store_cfg, run=RunConfig(id=run_id), store=replace(store_cfg.store, rescore=m))
        ctx, seconds = _stages(cfg, ["score", "merge"])
        lists = _shortlists(ctx, m)
        recall = [len(set(exact[q]) & lists.get(q, set())) / max(1, len(exact[q])) for q in exact]
        figures[f"rescore_{m}"] = {
            "top10_recall_in_own_shortlist": round(sum(recall) / len(recall), 3),
            "windows_rescored_share": round(
                ctx.counts["windows_rescored"] / ctx.counts["windows_in_rescored_shards"], 3),
            "top10_overlap_with_full_pass": _overlap(exact, _top10(root, run_id)),
            "score_s": ctx.timings["score_s"], "job_s": round(seconds, 1),
        }
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
    parser.add_argument("--rescore", type=int, nargs="*", default=[10, 20, 40], help="two-stage shortlist sizes")
    parser.add_argument("--smollm2", action="store_true", help="pretrained SmolLM2-135M instead of the demo")
    parser.add_argument("--docs", type=int, default=128, help="with --smollm2: documents")
    parser.add_argument("--queries", type=int, default=16, help="with --smollm2: queries per set")
    parser.add_argument("--window", type=int, default=128, help="with --smollm2: corpus.window")
    parser.add_argument("--docs-per-shard", type=int, default=64, help="with --smollm2: corpus.docs_per_shard")
    parser.add_argument("--root", default="", help="storage root (default: a fresh temporary folder, removed after)")
    parser.add_argument("--demo-cache", default="outputs/demo-cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or tempfile.mkdtemp(prefix="store-bench-")
    try:
        result = main(args.dim, args.dtype, os.path.abspath(root), args.demo_cache, args.rescore, args.smollm2,
                      args.docs, args.queries, args.window, args.docs_per_shard)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
