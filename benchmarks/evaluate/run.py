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
    storage = Storage(cfg.storage.root, cfg.storage.options)
    storage.check_writable()
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    log.info("evaluation %r on %s", cfg.name, device)
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
    result = clean_json(result)
    url = layout.evaluation_result(storage.root, cfg.name)
    storage.write_json(url, result)
    log.info("evaluation written to %s (%.1f s)", url, result["timings_s"]["total"])
    result["url"] = url
    return result
