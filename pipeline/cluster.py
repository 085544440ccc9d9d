"""Everything that touches Ray: starting or joining a cluster, worker actors, dispatch.

Workers are ``ShardWorker`` actors (one model each) created with restarts and
task retries; because every unit they write is committed last and skipped
when already committed, a retry after a crash neither loses nor duplicates
output. Ray only carries plain dataclasses and small dicts; tensors and
tables travel through storage as safetensors and Parquet.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from tqdm import tqdm

from pipeline.config import ClusterConfig
from pipeline.worker import KILL_ENV, ShardWorker, WorkerSpec

log = logging.getLogger(__name__)


@contextmanager
def ray_session(cfg: ClusterConfig) -> Iterator[None]:
    """Join ``cfg.address``, reuse a Ray already initialised in this process, or start a local one."""
    if ray.is_initialized():
        yield
        return
    env = {k: v for k, v in os.environ.items() if k == KILL_ENV}
    runtime_env = {"env_vars": env} if env else None
    if cfg.address:
        log.info("connecting to Ray at %s", cfg.address)
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = cfg.local_num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray with %d CPUs", num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def start_workers(spec: WorkerSpec, cfg: ClusterConfig) -> list:
    """``cfg.num_workers`` actors, each loading the model once; waits until all are ready."""
    actor = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )
    workers = [actor.remote(spec) for _ in range(cfg.num_workers)]
    started = time.perf_counter()
    ray.get([w.fingerprint.remote() for w in workers])
    log.info("%d workers ready in %.1fs", len(workers), time.perf_counter() - started)
    return workers


def run_units(workers: list, calls: list[tuple[str, tuple]], desc: str, slots_per_worker: int = 2) -> list[dict]:
    """Run ``worker.method(*args)`` for every call, at most ``slots_per_worker`` in flight per worker.

    Results come back in the order of ``calls``; a progress bar shows units and documents per second.
    """
    results: list = [None] * len(calls)
    queue = list(enumerate(calls))
    free = [w for w in workers for _ in range(slots_per_worker)]
    pending: dict = {}
    started, docs = time.perf_counter(), 0
    with tqdm(total=len(calls), desc=desc, unit="unit", dynamic_ncols=True, disable=not calls) as bar:
        while queue or pending:
            while queue and free:
                worker = free.pop()
                index, (method, args) = queue.pop(0)
                pending[getattr(worker, method).remote(*args)] = (index, worker)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, worker = pending.pop(ref)
                results[index] = ray.get(ref)
                free.append(worker)
                docs += results[index].num_docs or 0
                bar.update(1)
                if docs:
                    bar.set_postfix(docs_per_s=f"{docs / (time.perf_counter() - started):.1f}")
    return results
