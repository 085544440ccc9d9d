"""``run_evaluation``: every enabled experiment on the demo world, written as one JSON document."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict
from typing import Any

from benchmarks.common import clean_json, machine_info, resolve_device, torch_threads
from benchmarks.evaluate.backdoor import backdoor
from benchmarks.evaluate.config import EvaluateConfig
from benchmarks.evaluate.facts import facts_and_fidelity
from benchmarks.evaluate.real_model import smollm2_section
from benchmarks.evaluate.small_world import small_world
from benchmarks.evaluate.world import load_demo_world
from pipeline import layout
from pipeline.errors import ConfigError
from pipeline.storage import Storage

log = logging.getLogger(__name__)


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Every enabled section; writes ``{storage.root}/evaluations/{cfg.name}.json`` and returns it."""
    cfg.validate()
    with torch_threads(cfg.threads):
        return _run_evaluation(cfg)


def _run_evaluation(cfg: EvaluateConfig) -> dict:
    storage = cfg.storage.open()
    storage.check_writable()
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    log.info("evaluation %r of world %s on %s", cfg.name, cfg.world, device)
    if cfg.world == "smollm2":
        return _run_smollm2(cfg, storage, device, started)
    world = load_demo_world(cfg.demo.cache_dir, cfg.demo.spec())
    n_filler = sum(1 for d in world.docs if not d.get("is_planted_for"))
    if cfg.backdoor.enabled and n_filler < cfg.backdoor.n_docs + cfg.backdoor.n_queries:
        raise ConfigError(
            f"backdoor.n_docs={cfg.backdoor.n_docs} plus {cfg.backdoor.n_queries} held-out documents need more "
            f"filler documents than the demo has ({n_filler}); lower backdoor.n_docs or raise demo.n_filler_docs"
        )
    result: dict[str, Any] = {
        "name": cfg.name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "device": str(device),
        "config": asdict(cfg),
        "ekfac": {**{k: v for k, v in asdict(cfg.influence()).items() if k != "projection"},
                  "projection": cfg.projection_spec().to_json()},
        "demo": {"model_dir": world.artifacts.model_dir, "spec": asdict(world.spec),
                 "n_docs": len(world.docs), "n_facts": len(world.facts)},
        "timings_s": {"demo": time.perf_counter() - started},
    }
    result["config"]["storage"]["options"] = sorted(cfg.storage.options)
    if cfg.facts.enabled or cfg.fidelity.enabled:
        log.info("facts/fidelity: scoring the demo model")
        section = facts_and_fidelity(cfg, world, device)
        for key in ("facts", "fidelity"):
            if key in section:
                result[key] = section.pop(key)
        result["facts_world"] = section
    if cfg.backdoor.enabled:
        log.info("backdoor: training a model on the poisoned corpus")
        result["backdoor"] = backdoor(cfg, world, device)
    if cfg.small.oracle or cfg.small.lds:
        log.info("small world: oracle, kronfluence, LDS")
        result["small_world"] = small_world(cfg, world, device)
    result["timings_s"]["total"] = time.perf_counter() - started
    return _write(storage, cfg, result)


def _header(cfg: EvaluateConfig, device) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": cfg.name,
        "world": cfg.world,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "device": str(device),
        "config": asdict(cfg),
        "ekfac": {**{k: v for k, v in asdict(cfg.influence()).items() if k != "projection"},
                  "projection": cfg.projection_spec().to_json()},
    }
    result["config"]["storage"]["options"] = sorted(cfg.storage.options)
    return result


def _run_smollm2(cfg: EvaluateConfig, storage: Storage, device, started: float) -> dict:
    """The real-model world: the fidelity and cost sweep, the chosen default and planted facts (section smollm2).

    After each setting the partial result is written under the run's name
    with ``.partial`` appended, so a long sweep leaves its finished rows.
    """
    result = _header(cfg, device)
    result["timings_s"] = {}
    partial_url = layout.evaluation_result(storage.root, f"{cfg.name}.partial")
    rows: list[dict] = []

    partial: dict[str, Any] = {"settings": rows}

    def on_fidelity(agreements: dict, scores: dict) -> None:
        partial["agreement"] = agreements
        partial["window_scores"] = {k: v.tolist() for k, v in scores.items()}
        storage.write_json(partial_url, clean_json({**result, "smollm2": partial}))

    def on_setting(row: dict) -> None:
        rows.append(row)
        storage.write_json(partial_url, clean_json({**result, "smollm2": partial}))

    result["smollm2"] = smollm2_section(cfg, device, on_setting, on_fidelity)
    result["timings_s"]["total"] = time.perf_counter() - started
    return _write(storage, cfg, result)


def _write(storage: Storage, cfg: EvaluateConfig, result: dict) -> dict:
    result = clean_json(result)
    url = layout.evaluation_result(storage.root, cfg.name)
    storage.write_json(url, result)
    log.info("evaluation written to %s (%.1f s)", url, result["timings_s"]["total"])
    result["url"] = url
    return result
