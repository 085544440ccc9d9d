"""The Ray side of the driver: starting or joining a cluster, worker actors, dispatch of units.

The driver (``pipeline.run``, ``pipeline.merge.merge_run``) calls the actors
started here through ``run_units`` and ``call_within``, both bounded by
``cluster.stall_timeout_s``; the worker code (``pipeline.worker``) imports no Ray.

Workers are ``ShardWorker`` actors (one model each) created with restarts and
task retries; because every unit they write is committed last and skipped
when already committed, a retry after a crash neither loses nor duplicates
output. Ray only carries plain dataclasses and small dicts; tensors and
tables travel through storage as safetensors and Parquet.

With ``cluster.reuse_workers`` a driver process that runs several jobs one
after another (a notebook, a test suite) keeps its
workers for its next run when that run would start them alike (the same
`WorkerSpec` and worker resources): each is reset (``ShardWorker.reset``:
storage, model and engine built again from its spec, caches dropped, counters
at zero), which saves starting a process and importing torch and transformers
(8-14 s per worker on a 2-core VM). Kept workers a run does not take are
killed first, so their resources are free for the ones it starts;
``release_workers`` kills them when the process needs the resources back.

Nothing waits without bound: the request (``cluster.num_workers`` actors of
``cluster.cpus_per_worker`` CPUs and ``cluster.gpus_per_worker`` GPUs) is
checked against the cluster's nodes before any actor is created (waiting up
to ``cluster.placement_timeout_s`` for an autoscaler to add nodes), and
starting the workers or running units fails with `ClusterError` when nothing
finishes for ``cluster.stall_timeout_s``, after logging what was in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from tqdm import tqdm

from pipeline.config import ClusterConfig
from pipeline.errors import ClusterError
from pipeline.worker import KILL_ENV, ShardWorker, WorkerSpec

log = logging.getLogger(__name__)

# How often a wait wakes up to check its deadline.
_POLL_S = 5.0


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


def placeable_workers(cfg: ClusterConfig) -> tuple[int, dict]:
    """How many workers of the requested size fit on the cluster's live nodes, and the cluster's totals.

    Counted node by node (an actor's CPUs and GPUs must sit on one node), on
    total, not currently free, resources: what other jobs hold now is a wait,
    not an impossibility.
    """
    fits, totals = 0, {"nodes": 0, "CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources") or {}
        totals["nodes"] += 1
        totals["CPU"] += res.get("CPU", 0.0)
        totals["GPU"] += res.get("GPU", 0.0)
        per_node = [res.get("CPU", 0.0) / cfg.cpus_per_worker]
        if cfg.gpus_per_worker > 0:
            per_node.append(res.get("GPU", 0.0) / cfg.gpus_per_worker)
        fits += int(min(per_node) + 1e-9)  # 1.0 / 0.5 must count as 2 despite rounding
    return fits, totals


def check_placement(cfg: ClusterConfig) -> None:
    """Raise `ClusterError` naming the ``cluster.*`` keys when the workers cannot be placed.

    Waits up to ``cfg.placement_timeout_s`` (0: not at all) for nodes to join, as an autoscaler adds them.
    """
    deadline = time.monotonic() + cfg.placement_timeout_s
    while True:
        fits, totals = placeable_workers(cfg)
        if fits >= cfg.num_workers:
            return
        if time.monotonic() >= deadline:
            break
        log.info("%d of %d workers fit on the cluster now; waiting for nodes (cluster.placement_timeout_s=%g)",
                 fits, cfg.num_workers, cfg.placement_timeout_s)
        time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.1)))
    gpus = f" and cluster.gpus_per_worker={cfg.gpus_per_worker:g} GPUs" if cfg.gpus_per_worker > 0 else ""
    raise ClusterError(
        f"cluster.num_workers={cfg.num_workers} workers of cluster.cpus_per_worker={cfg.cpus_per_worker:g} CPUs{gpus} "
        f"cannot be placed: the cluster has {totals['nodes']} live node(s) with {totals['CPU']:g} CPUs and "
        f"{totals['GPU']:g} GPUs in all, room for {fits} such worker(s); lower cluster.num_workers, "
        "cluster.cpus_per_worker or cluster.gpus_per_worker, or set cluster.placement_timeout_s to wait for an "
        "autoscaler to add nodes"
    )


# Workers kept for the next run of this driver process (cluster.reuse_workers): the Ray session they live in
# (node and job id), the resources and spec they were started with, and their handles.
_kept: dict = {"session": None, "started_as": None, "workers": []}


def _session() -> tuple[str, str]:
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


def _started_as(spec: WorkerSpec, cfg: ClusterConfig) -> tuple:
    return spec, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.max_restarts


def _differences(before: tuple, now: tuple) -> list[str]:
    """The names of the ``WorkerSpec`` fields (and worker resources) in which ``before`` and ``now`` differ."""
    names = [f.name for f in dataclasses.fields(WorkerSpec) if getattr(before[0], f.name) != getattr(now[0], f.name)]
    return names + [n for n, a, b in zip(("cpus", "gpus", "restarts"), before[1:], now[1:]) if a != b]


def _take_kept(spec: WorkerSpec, cfg: ClusterConfig) -> list:
    """The kept workers this run can reuse, reset; every other kept worker is killed first.

    Only workers started with this very spec and resources are reused: Ray restarts a crashed actor with
    the arguments it was created with, so a reused worker must have been created as this run's would be.
    """
    kept = _kept["workers"]
    if not kept:
        return []
    same_session = _kept["session"] == _session()
    take = kept[: cfg.num_workers] if cfg.reuse_workers and same_session and _kept["started_as"] == _started_as(
        spec, cfg) else []
    if cfg.reuse_workers and same_session and not take:
        log.info("kept workers not reused: started with other %s", ", ".join(_differences(
            _kept["started_as"], _started_as(spec, cfg))) or "settings")
    _kept.update(session=None, started_as=None, workers=[])
    for worker in kept[len(take):]:
        if same_session:  # a handle from an earlier Ray session is dead already
            ray.kill(worker, no_restart=True)
    if not take:
        return []
    try:
        ray.get([w.reset.remote() for w in take], timeout=cfg.stall_timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        log.warning("kept workers could not be reused (%s); starting new ones", type(e).__name__)
        for worker in take:
            ray.kill(worker, no_restart=True)
        return []
    return take


def release_workers() -> None:
    """Kill the workers kept for this process's next run (``cluster.reuse_workers``), freeing their CPUs and GPUs."""
    kept = _kept["workers"]
    same_session = bool(kept) and ray.is_initialized() and _kept["session"] == _session()
    _kept.update(session=None, started_as=None, workers=[])
    for worker in kept if same_session else []:
        ray.kill(worker, no_restart=True)


def start_workers(spec: WorkerSpec, cfg: ClusterConfig) -> list:
    """``cfg.num_workers`` actors, each loading the model once; waits until all are ready.

    With ``cfg.reuse_workers`` the workers kept by this process's last run (``keep_workers``) are reused
    when they were started alike (see the module's docstring).
    Raises `ClusterError` when they cannot be placed or are not ready within ``cfg.stall_timeout_s``.
    """
    reused = _take_kept(spec, cfg)
    check_placement(cfg)
    actor = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )
    workers = reused + [actor.remote(spec) for _ in range(cfg.num_workers - len(reused))]
    started = time.perf_counter()
    try:
        ray.get([w.fingerprint.remote() for w in workers], timeout=cfg.stall_timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise ClusterError(
            f"{len(workers)} workers were not ready within cluster.stall_timeout_s={cfg.stall_timeout_s:g}: "
            "placed but stuck loading the model (model.path download?), or waiting for resources other jobs "
            "hold; raise cluster.stall_timeout_s or check the nodes"
        ) from e
    log.info("%d workers ready in %.1fs%s", len(workers), time.perf_counter() - started,
             f" ({len(reused)} kept from the last run)" if reused else "")
    return workers


def keep_workers(workers: list, spec: WorkerSpec, cfg: ClusterConfig) -> None:
    """Keep a finished run's ``workers`` for this process's next run (``cluster.reuse_workers``).

    Called only after a run whose stages all finished: a failed run's workers may be wedged in a unit.
    """
    if cfg.reuse_workers and workers:
        _kept.update(session=_session(), started_as=_started_as(spec, cfg), workers=list(workers))


def call_within(worker, method: str, *args, stall_timeout_s: float = ClusterConfig.stall_timeout_s):
    """``worker.method(*args)``'s result, or `ClusterError` when it does not come within ``stall_timeout_s``."""
    try:
        return ray.get(getattr(worker, method).remote(*args), timeout=stall_timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise ClusterError(
            f"a worker's {method} did not return within cluster.stall_timeout_s={stall_timeout_s:g}; check storage "
            "and the workers, or raise cluster.stall_timeout_s"
        ) from e


def _unit_name(method: str, args: tuple) -> str:
    """``method(shard id)``, else ``method(the last part of its output URL)``, for logs of units in flight."""
    shard = getattr(args[0], "shard_id", None) if args else None
    if shard is None:
        out = next((a for a in args if isinstance(a, str) and "/" in a), None)
        shard = out.rstrip("/").rsplit("/", 1)[-1] if out else None
    return f"{method}({shard})" if shard else method


def run_units(
    workers: list,
    calls: list[tuple[str, tuple]],
    desc: str,
    slots_per_worker: int = 2,
    stall_timeout_s: float = ClusterConfig.stall_timeout_s,
    shards_per_unit: int = 1,
) -> list[dict]:
    """Run ``worker.method(*args)`` for every call, at most ``slots_per_worker`` in flight per worker.

    Each unit goes to a worker with the fewest units in flight (the first such in ``workers``), so
    every worker is busy before any gets a second unit: fewer units than slots still run in parallel.
    Results come back in the order of ``calls``; a progress bar shows units and documents per second.
    When no unit finishes for ``stall_timeout_s`` x ``shards_per_unit`` (the bound is per shard of work;
    a fit unit holds up to that many shards) the units in flight are logged
    and `ClusterError` is raised (a hung storage call or a wedged worker must
    not hold the run forever).
    """
    bound = stall_timeout_s * max(shards_per_unit, 1)
    said = f"cluster.stall_timeout_s={stall_timeout_s:g}" + (
        f" x {shards_per_unit} shards per unit" if shards_per_unit > 1 else "")
    results: list = [None] * len(calls)
    queue = list(enumerate(calls))
    in_flight = [0] * len(workers)
    pending: dict = {}
    started, docs = time.perf_counter(), 0
    last_progress = time.monotonic()
    with tqdm(total=len(calls), desc=desc, unit="unit", dynamic_ncols=True, disable=not calls) as bar:
        while queue or pending:
            while queue and min(in_flight) < slots_per_worker:
                w = in_flight.index(min(in_flight))
                index, (method, args) = queue.pop(0)
                pending[getattr(workers[w], method).remote(*args)] = (index, w)
                in_flight[w] += 1
            left = bound - (time.monotonic() - last_progress)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(min(left, _POLL_S), 0.0))
            if not done and time.monotonic() - last_progress >= bound:
                in_flight = [_unit_name(*calls[index]) for index, _ in pending.values()]
                log.error("%s: no unit finished for %.0fs; in flight: %s", desc, bound, in_flight)
                raise ClusterError(
                    f"{desc}: no unit finished within {said} "
                    f"({len(pending)} in flight, e.g. {in_flight[:3]}; {len(queue)} waiting); see the log for "
                    "the units, then check storage and the workers, or raise cluster.stall_timeout_s"
                )
            if done:
                last_progress = time.monotonic()
            for ref in done:
                index, w = pending.pop(ref)
                results[index] = ray.get(ref)
                in_flight[w] -= 1
                docs += results[index].num_docs or 0
                bar.update(1)
                if docs:
                    bar.set_postfix(docs_per_s=f"{docs / (time.perf_counter() - started):.1f}")
    return results


class _TaskPool:
    """Stands in for an actor in `run_units`: its method ``run`` submits ``fn`` as a Ray task."""

    def __init__(self, fn, max_retries: int):
        # No CPUs reserved: the scoring actors may hold them all; concurrency is bounded by run_units' slots.
        self.run = ray.remote(fn).options(num_cpus=0, max_retries=max_retries)


def run_tasks(fn, calls: list[tuple], desc: str, slots: int = 2, max_retries: int = 3,
              stall_timeout_s: float = ClusterConfig.stall_timeout_s) -> list:
    """``fn(*args)`` as Ray tasks (no actor, no model) for every ``args`` in ``calls``, ``slots`` in flight.

    Results in the order of ``calls``; bounded by ``stall_timeout_s`` as `run_units` is.
    """
    pool = _TaskPool(fn, max_retries)
    return run_units([pool], [("run", args) for args in calls], desc, slots_per_worker=slots,
                     stall_timeout_s=stall_timeout_s)


def unwrap_remote(exc: BaseException) -> tuple[BaseException, str | None]:
    """``(what failed, the remote traceback)`` of an exception a Ray call raised; ``(exc, None)`` otherwise.

    A task's own exception comes back as ``RayTaskError(cause)``, whose text is
    the whole remote traceback: the cause is what the job reports, the text
    goes to the failure log. A lost actor, node or object is an infrastructure
    fault (`ClusterError`).
    """
    from ray import exceptions as rx

    if isinstance(exc, rx.RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        return cause, str(exc)
    lost = (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError, rx.OutOfMemoryError,
            rx.RaySystemError)
    if isinstance(exc, lost):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        lost_error = ClusterError(
            f"a Ray worker or node was lost ({type(exc).__name__}: {first}); committed units are kept, rerun to "
            "finish, and raise cluster.max_restarts if workers die often"
        )
        return lost_error, str(exc)
    return exc, None
