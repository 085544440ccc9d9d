"""``run_benchmark``: every speed and memory measurement in one run, written as one JSON document.

On one model, corpus and machine: (1) the ceiling, plain forward + backward
tokens/s; (2) our scoring tokens/s and its ratio to the ceiling; (3) ours
against kronfluence end to end, with the top-k overlap; (4) peak RSS of one
scoring worker at N and 10 N documents; (5) merge rows/s; (6) scoring
throughput with 1 and 2 Ray workers. A section that cannot run here
(kronfluence not installed) or is switched off is ``null`` with the reason
under ``notes``; nothing is estimated.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any

from benchmarks.common import clean_json, machine_info, resolve_device, torch_threads
from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import prepare_inputs
from benchmarks.speed.memory import memory
from benchmarks.speed.merge import merge_benchmark
from benchmarks.speed.scaling import scaling
from benchmarks.speed.throughput import throughput
from benchmarks.speed.versus_kronfluence import versus_kronfluence
from pipeline import heap, layout

log = logging.getLogger(__name__)


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Every measurement; writes ``{storage.root}/benchmarks/{cfg.name}.json`` and returns it."""
    cfg.validate()
    with torch_threads(cfg.threads):
        return _run_benchmark(cfg)


def _run_benchmark(cfg: BenchmarkConfig) -> dict:
    storage = cfg.storage.open()
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

        # The throughput phase's buffers go back to the OS before the Ray workers start (on a 24 GiB machine
        # a driver still holding them crowded the workers out: Ray's memory monitor killed them).
        heap.release()
        if cfg.query_counts:
            log.info("3: against kronfluence")
            vk = versus_kronfluence(cfg, inputs, device, work, notes)
            result["versus_kronfluence"] = vk
            result.update(_headline_versus_kronfluence(vk["by_queries"], default_key))
        else:
            notes["versus_kronfluence"] = "disabled by config (query_counts=[])"

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
            mg = merge_benchmark(cfg)
            result["merge"] = mg
            result["merge_rows_per_s"] = mg["rows_per_s"]
        else:
            notes["merge"] = "disabled by config"

        result["scaling_2_workers"] = None
        if cfg.scaling:
            log.info("6: scaling over Ray workers %s", cfg.scaling_workers)
            sc = scaling(cfg, inputs, device, work)
            result["scaling"] = sc
            if "1" in sc["by_workers"] and "2" in sc["by_workers"]:
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


def _headline_versus_kronfluence(by_q: dict, default_key: str) -> dict:
    """Per query count: ours' and kronfluence's seconds, the speedup and the top-k overlap."""

    def per_q(fn):
        return {q: fn(p) for q, p in by_q.items()}

    out = {
        "ours_seconds": per_q(lambda p: p["ours"][default_key]["seconds"]),
        "kronfluence_seconds": per_q(lambda p: p.get("kronfluence", {}).get("seconds")),
        "speedup_vs_kronfluence": per_q(lambda p: p["ours"][default_key].get("speedup_vs_kronfluence")),
        "fit_ceiling_passes": per_q(lambda p: p["ours"][default_key]["fit_ceiling_passes"]),
        "topk_overlap_vs_kronfluence": per_q(lambda p: p["ours"][default_key].get("topk_overlap_vs_kronfluence")),
    }
    if any("kronfluence_longest_first" in p for p in by_q.values()):
        out["kronfluence_longest_first_seconds"] = per_q(lambda p: p.get("kronfluence_longest_first", {}).get("seconds"))
        out["speedup_vs_kronfluence_longest_first"] = per_q(
            lambda p: p["ours"][default_key].get("speedup_vs_kronfluence_longest_first"))
    if "dim=0" in next(iter(by_q.values()))["ours"]:
        out["topk_overlap_vs_kronfluence_dim0"] = per_q(lambda p: p["ours"]["dim=0"].get("topk_overlap_vs_kronfluence"))
    return out
