"""Retention: remove runs beyond a policy and every shared object no kept run references (``jobs/gc.py``).

Runs are the catalog's (`pipeline.catalog`) that are not ``deleted``, newest
start first. A run is kept when it is among the ``gc.keep_last`` newest or
started within ``gc.keep_days`` (either rule keeps it; at least one must be
given), and always while it is ``running`` (it may be writing) unless it
started more than ``gc.running_stale_hours`` ago (its driver died without
marking it failed). A run folder
with no catalog row (written before the catalog existed) is always kept, and
so is what its manifest references. A policy that would delete the run
``latest.json`` names is refused (`ConfigError`).

What a kept run references, from its manifest: its factors (``factors/{id}/``,
their pin), its query gradients (``queries/{id}/``) and its shard results
(``results/{key}/{shard_id}.parquet`` for the shards it lists; for a
two-stage run also its shortlists under ``results.shortlist_key``), and the
gradient stores of its factors (``store/{id}/``: their blocks of its query
sets and of the shards it lists). Everything else under ``factors/``,
``queries/``, ``results/``, ``store/`` and ``factor_pins/`` goes,
and so do the fitting partials and eigenbases of kept factors (a committed
factors file is all a rerun reads). While some run is ``running`` its
references are unknown, so no shared object is deleted (runs only).

Dry run by default: `plan_gc` lists what would go; ``gc.apply=true`` deletes
it, each run's catalog row marked ``deleted`` before its folder goes and every
unit's commit marker before its data, so nothing half-deleted is ever trusted.
Do not run gc while a run is starting: a run that has planned to reuse a
result gc then deletes finds it uncommitted and scores it again.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from pipeline import catalog, layout
from pipeline.config import ConfigError, StorageConfig

log = logging.getLogger(__name__)


@dataclass
class GcOptions:
    # Keep the N runs that started last (0: no such rule).
    keep_last: int = 0
    # Keep the runs that started within this many days (0: no such rule).
    keep_days: float = 0.0
    # false: print what would be deleted; true: delete it.
    apply: bool = False
    # A run still "running" this many hours after its start is taken as abandoned (its driver died).
    running_stale_hours: float = 24.0


@dataclass
class GcConfig:
    """``python jobs/gc.py gc.keep_last=7 [gc.apply=true]``."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    gc: GcOptions = field(default_factory=GcOptions)

    def validate(self) -> None:
        if self.gc.keep_last < 0 or self.gc.keep_days < 0:
            raise ConfigError(f"gc.keep_last and gc.keep_days must be >= 0, got {self.gc.keep_last}, "
                              f"{self.gc.keep_days}")
        if self.gc.running_stale_hours <= 0:
            raise ConfigError(f"gc.running_stale_hours must be > 0, got {self.gc.running_stale_hours}")
        if not self.gc.keep_last and not self.gc.keep_days:
            raise ConfigError("no retention policy: give gc.keep_last=N and/or gc.keep_days=D")


def register_configs() -> None:
    from pipeline.config import store_schema

    store_schema("gc_schema", GcConfig, mandatory=("storage.root",))


@dataclass
class GcPlan:
    kept_runs: list[str]
    deleted_runs: list[str]
    # Units (file URLs; their commit markers go first) and folders to delete.
    files: list[str]
    folders: list[str]
    note: str = ""  # e.g. why shared objects are kept this time


def _started(row: dict) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(row["started_at"])
    except (TypeError, ValueError):  # no start recorded: the oldest
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _running(rows: list[dict], now: dt.datetime, stale_hours: float) -> set[str]:
    """The runs that may still be writing: ``running`` and started less than ``stale_hours`` ago."""
    since = now - dt.timedelta(hours=stale_hours)
    return {r["run_id"] for r in rows if r["status"] == catalog.RUNNING and _started(r) >= since}


def _kept(rows: list[dict], keep_last: int, keep_days: float, now: dt.datetime, running: set[str]) -> set[str]:
    newest_first = sorted(rows, key=lambda r: (_started(r), r["run_id"]), reverse=True)
    kept = {r["run_id"] for r in newest_first[:keep_last]} if keep_last else set()
    if keep_days:
        since = now - dt.timedelta(days=keep_days)
        kept |= {r["run_id"] for r in rows if _started(r) >= since}
    return kept | running


def _references(storage, run_ids: list[str]) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Factors ids, queries ids and (results key, shard id) pairs the runs' manifests name."""
    factors, queries, results = set(), set(), set()
    for run_id in run_ids:
        try:
            m = storage.read_json(layout.run_manifest(storage.root, run_id))
        except FileNotFoundError:
            continue
        factors.add(m["factors_id"])
        queries.add(m["queries_id"])
        for name in ("key", "shortlist_key"):  # shortlist_key: two-stage runs' first stage
            key = (m.get("results") or {}).get(name)
            if key:
                results |= {(key, s) for s in m["shards"]}
    return factors, queries, results


def _names(storage, *parts: str) -> list[str]:
    return [u.rstrip("/").rsplit("/", 1)[-1] for u in storage.ls(layout.url(storage.root, *parts))]


def plan_gc(storage, keep_last: int, keep_days: float, now: dt.datetime | None = None,
            running_stale_hours: float = 24.0) -> GcPlan:
    """What a policy keeps and deletes; refuses (`ConfigError`) one that would delete latest.json's run."""
    now = now or dt.datetime.now(dt.timezone.utc)
    rows = [r for r in catalog.read_catalog(storage) if r["status"] != catalog.DELETED]
    running = _running(rows, now, running_stale_hours)
    kept = _kept(rows, keep_last, keep_days, now, running)
    latest = catalog.read_latest(storage)
    if latest and latest.get("run_id") not in kept and any(r["run_id"] == latest["run_id"] for r in rows):
        raise ConfigError(
            f"gc policy (gc.keep_last={keep_last}, gc.keep_days={keep_days}) would delete run "
            f"{latest['run_id']!r}, which latest.json names; keep more runs"
        )
    deleted = sorted(r["run_id"] for r in rows if r["run_id"] not in kept)
    uncatalogued = sorted(set(_names(storage, "runs")) - {r["run_id"] for r in catalog.read_catalog(storage)})
    kept_ids = sorted(kept | set(uncatalogued))
    files, folders = [], [layout.run_dir(storage.root, r) for r in deleted]
    if running:
        return GcPlan(kept_ids, deleted, [], folders,
                      f"run(s) {sorted(running)} are running: shared objects are kept this time")
    factors, queries, results = _references(storage, kept_ids)
    root = storage.root
    for fid in _names(storage, "factors"):
        if fid not in factors:
            folders.append(layout.factors_dir(root, fid))
        else:
            folders += [layout.url(layout.factors_dir(root, fid), "partials"), layout.eigenbases(root, fid)]
            files.append(layout.legacy_eigenbases(root, fid))
    for sid in _names(storage, "factor_pins"):
        pin_url = layout.url(root, "factor_pins", sid)
        if storage.read_json(pin_url).get("factors_id") not in factors:
            files.append(pin_url)
    folders += [layout.queries_dir(root, q) for q in _names(storage, "queries") if q not in queries]
    _plan_stores(storage, factors, queries, {s for _, s in results}, files, folders)
    keys = {k for k, _ in results}
    for key in _names(storage, "results"):
        if key not in keys:
            folders.append(layout.results_dir(root, key))
            continue
        for url in storage.ls(layout.results_dir(root, key)):
            name = url.rsplit("/", 1)[-1]
            if name.endswith(".parquet") and (key, name[: -len(".parquet")]) not in results:
                files.append(url)
    folders = [f for f in folders if storage.exists(f)]
    files = [f for f in files if storage.exists(f) or storage.exists(layout.file_marker(f))]
    return GcPlan(kept_ids, deleted, files, folders)


def _plan_stores(storage, factors: set[str], queries: set[str], shards: set[str], files: list, folders: list) -> None:
    """Gradient stores (`pipeline.store`): a store of factors no kept run uses goes whole; in a kept one,
    the blocks of query sets and the files of shards no kept run references go. A store whose
    ``key.json`` cannot be read is kept (what it belongs to is unknown)."""
    root = storage.root
    for store_id in _names(storage, "store"):
        try:
            key = storage.read_json(layout.store_key_file(root, store_id))
        except FileNotFoundError:
            log.warning("gc: store %s has no key.json; kept", store_id)
            continue
        if key.get("factors") not in factors:
            folders.append(layout.store_dir(root, store_id))
            continue
        for sub, wanted in (("queries", queries), ("shards", shards)):
            for url in storage.ls(layout.url(layout.store_dir(root, store_id), sub)):
                name = url.rsplit("/", 1)[-1]
                if name.endswith(".safetensors") and name[: -len(".safetensors")] not in wanted:
                    files.append(url)


def apply_gc(storage, plan: GcPlan) -> None:
    """Delete what ``plan`` lists: catalog rows marked deleted first, then run folders, then shared objects."""
    for run_id in plan.deleted_runs:
        row = catalog.read_entry(storage, run_id)
        if row is not None:
            catalog.write_entry(storage, {**row, "status": catalog.DELETED, "ended_at": catalog.now_utc()})
    for url in plan.files:
        storage.rm(layout.file_marker(url))
        storage.rm(url)
    for url in plan.folders:
        storage.rm(url, recursive=True)
    log.info("gc deleted %d run(s), %d file(s), %d folder(s)", len(plan.deleted_runs), len(plan.files),
             len(plan.folders))


def describe(plan: GcPlan, applied: bool) -> str:
    verb = "deleted" if applied else "would delete"
    lines = [f"gc: keeps {len(plan.kept_runs)} run(s) {plan.kept_runs}; {verb} {len(plan.deleted_runs)} run(s) "
             f"{plan.deleted_runs}, {len(plan.folders)} folder(s) and {len(plan.files)} file(s)"]
    if plan.note:
        lines.append(f"  note: {plan.note}")
    lines += [f"  {verb} {u}" for u in plan.folders + plan.files]
    if not applied:
        lines.append("  (dry run: nothing deleted; gc.apply=true deletes)")
    return "\n".join(lines)
