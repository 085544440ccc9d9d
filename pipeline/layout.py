"""Every storage path of the project: pure functions of the storage root and ids (no I/O).

``root`` is a `pipeline.storage.Storage`'s ``root`` (an absolute local path or
an ``s3://bucket/prefix`` URL). Every id is checked by `validate_name`, so no
path can leave its folder::

    {root}/factors/{factors_id}/partials/cov-{unit}.safetensors         A/S partial sums of one fit unit
    {root}/factors/{factors_id}/eigenbases.safetensors                  Q_A, Q_S of the summed covariances
    {root}/factors/{factors_id}/partials/lambda-{unit}.safetensors      Lambda partial sums of one fit unit
    {root}/factors/{factors_id}/factors.safetensors                     the fitted EK-FAC factors
    {root}/queries/{queries_id}/gradients.safetensors                   preconditioned query gradients
    {root}/queries/{queries_id}/parts/{i}-of-{n}.safetensors            the workers' slices, joined into it
    {root}/results/{results_key}/{shard_id}.parquet                     one shard's top-k, shared by runs (issue 8)
    {root}/factor_pins/{settings_id}.json                               the factors pinned for these settings
    {root}/store/{store_id}/shards/{shard_id}.safetensors               one shard's gradient store (pipeline.store)
    {root}/catalog/runs/{run_id}.parquet                                one run's row of the run catalog
    {root}/diffs/{run_a}__vs__{run_b}.parquet                           jobs/diff.py's table
    {root}/runs/{run_id}/shards/{shard_id}.parquet                      one shard's top-k (before issue 8)
    {root}/runs/{run_id}/attribution/part-00000.parquet                 the ranked table (a Parquet dataset)
    {root}/runs/{run_id}/{table}/part-00000.parquet                     the run's other tables (pipeline.tables)
    {root}/runs/{run_id}/report.html                                    the run's report
    {root}/runs/{run_id}/manifest.json                                  the run's provenance
    {root}/runs/{run_id}/logs/failure-{stamp}.log                       a failed job's remote traceback
    {root}/latest.json                                                  the newest complete run
    {root}/benchmarks/{name}.json, {root}/evaluations/{name}.json       measurement results

A file unit is committed by ``{unit}.commit.json``, a folder unit by
``{unit}/_COMMITTED.json`` (see `pipeline.commit`); the leading ``_`` keeps the
marker out of a pyarrow or DuckDB dataset read of the folder.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.errors import ConfigError

FILE_MARKER_SUFFIX = ".commit.json"
DIR_MARKER_NAME = "_COMMITTED.json"
MAX_NAME_LENGTH = 200

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_NAME_RULE = (
    f"use 1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 '.' '_' '-', not starting with '.'"
)


def validate_name(value: Any, what: str) -> str:
    """Check that ``value`` is a safe single path name (an id) and return it.

    Allowed: 1-200 characters from ``[A-Za-z0-9._-]``, not starting with ``.``
    (so never ``.`` or ``..``). ``what`` names the input in the error, e.g.
    ``validate_name(run_id, "run.id")``. Raises `ConfigError` (a ``ValueError``).
    """
    if not isinstance(value, str):
        raise ConfigError(
            f"{what}={value!r} must be a string (got {type(value).__name__}); "
            f"quote it, and {_NAME_RULE}"
        )
    if not value:
        raise ConfigError(f"{what} is empty; {_NAME_RULE}")
    if len(value) > MAX_NAME_LENGTH:
        raise ConfigError(f"{what}={value[:40]!r}... is {len(value)} characters long; {_NAME_RULE}")
    if value.startswith("."):
        raise ConfigError(f"{what}={value!r} starts with '.'; {_NAME_RULE}")
    if not _NAME_RE.fullmatch(value):
        bad = sorted({c for c in value if not _NAME_RE.fullmatch(c)})
        raise ConfigError(f"{what}={value!r} contains {''.join(bad)!r}; {_NAME_RULE}")
    return value


def _check_part(part: Any, allow_hidden: bool) -> str:
    """Check one path component given to `url`: a single, non-special name."""
    rule = (
        "a path part must be one non-empty name without '/', '\\' or NUL, not '.' or '..'"
        + ("" if allow_hidden else ", and not starting with '.'")
    )
    if not isinstance(part, str):
        raise ValueError(f"path part {part!r} is a {type(part).__name__}, not a string; {rule}")
    if not part:
        raise ValueError(f"path part '' is empty; {rule}")
    if part in (".", ".."):
        raise ValueError(f"path part {part!r} is not allowed; {rule}")
    for bad, label in (("/", "'/'"), ("\\", "'\\'"), ("\0", "NUL")):
        if bad in part:
            raise ValueError(f"path part {part!r} contains {label}; {rule}")
    if part.startswith(".") and not allow_hidden:
        raise ValueError(f"path part {part!r} starts with '.'; {rule}")
    return part


def url(root: str, *parts: str, allow_hidden: bool = False) -> str:
    """The URL of ``root/part1/part2/...``; every part is validated (see `_check_part`).

    Raises ``ValueError`` naming the part when it is empty, ``.``/``..``,
    contains ``/``, ``\\`` or NUL, or starts with ``.`` (unless ``allow_hidden``).
    """
    checked = [_check_part(p, allow_hidden) for p in parts]
    if not checked:
        return root
    return root.rstrip("/") + "/" + "/".join(checked)


# ---- factors and queries (content-addressed, shared by every run that needs them) --------------


def factors_dir(root: str, factors_id: str) -> str:
    """Folder of one fitted set of EK-FAC factors: ``{root}/factors/{factors_id}``."""
    return url(root, "factors", validate_name(factors_id, "factors id"))


def factors_file(root: str, factors_id: str) -> str:
    """The fitted factors: ``{root}/factors/{factors_id}/factors.safetensors``."""
    return url(factors_dir(root, factors_id), "factors.safetensors")


def covariance_partial(root: str, factors_id: str, shard_id: str) -> str:
    """One fit unit's A/S sums, a folder of one file per layer group (`group_file`):
    ``{root}/factors/{factors_id}/partials/cov-{shard_id}``.

    ``shard_id``: the unit's name (`pipeline.corpus.unit_key`), its shard's id when it holds one.
    """
    shard = validate_name(shard_id, "shard id")
    return url(factors_dir(root, factors_id), "partials", f"cov-{shard}")


def group_file(index: int, count: int) -> str:
    """The name of layer group ``index`` of ``count`` in a folder of groups: ``{index:03d}-of-{count:03d}.safetensors``."""
    return f"{index:03d}-of-{count:03d}.safetensors"


def lambda_partial(root: str, factors_id: str, shard_id: str) -> str:
    """One fit unit's Lambda sums: ``{root}/factors/{factors_id}/partials/lambda-{shard_id}.safetensors``."""
    shard = validate_name(shard_id, "shard id")
    return url(factors_dir(root, factors_id), "partials", f"lambda-{shard}.safetensors")


def eigenbases(root: str, factors_id: str) -> str:
    """The eigenbases the Lambda pass rotates into, one file per layer group (`eigenbases_group`):
    ``{root}/factors/{factors_id}/eigenbases``."""
    return url(factors_dir(root, factors_id), "eigenbases")


def eigenbases_group(root: str, factors_id: str, index: int, count: int) -> str:
    """One layer group's eigenbases: ``{root}/factors/{factors_id}/eigenbases/{index:03d}-of-{count:03d}.safetensors``."""
    return url(eigenbases(root, factors_id), group_file(index, count))


def legacy_eigenbases(root: str, factors_id: str) -> str:
    """Where fits before 2026-12-07 (eigendecomposed on the driver) wrote all eigenbases in one file."""
    return url(factors_dir(root, factors_id), "eigenbases.safetensors")


def queries_dir(root: str, queries_id: str) -> str:
    """Folder of one preconditioned query set: ``{root}/queries/{queries_id}``."""
    return url(root, "queries", validate_name(queries_id, "queries id"))


def query_gradients(root: str, queries_id: str) -> str:
    """Preconditioned query gradients: ``{root}/queries/{queries_id}/gradients.safetensors``."""
    return url(queries_dir(root, queries_id), "gradients.safetensors")


def query_part(root: str, queries_id: str, index: int, count: int) -> str:
    """One worker's slice of the query set: ``{root}/queries/{queries_id}/parts/{index}-of-{count}.safetensors``."""
    return url(queries_dir(root, queries_id), "parts", f"{index:04d}-of-{count:04d}.safetensors")


# ---- runs -------------------------------------------------------------------------------------


def run_dir(root: str, run_id: str) -> str:
    """Folder of one scoring run: ``{root}/runs/{run_id}``."""
    return url(root, "runs", validate_name(run_id, "run.id"))


def shard_result(root: str, run_id: str, shard_id: str) -> str:
    """One shard's top-k table: ``{root}/runs/{run_id}/shards/{shard_id}.parquet``."""
    shard = validate_name(shard_id, "shard id")
    return url(run_dir(root, run_id), "shards", f"{shard}.parquet")


def attribution_dir(root: str, run_id: str) -> str:
    """The merged, ranked Parquet dataset of a run: ``{root}/runs/{run_id}/attribution``."""
    return url(run_dir(root, run_id), "attribution")


def attribution_part(root: str, run_id: str, index: int = 0) -> str:
    """One file of the ranked dataset: ``{root}/runs/{run_id}/attribution/part-{index:05d}.parquet``."""
    return url(attribution_dir(root, run_id), f"part-{index:05d}.parquet")


def run_table_part(root: str, run_id: str, table: str, index: int = 0) -> str:
    """One file of a run table (`pipeline.tables.TABLES`): ``{root}/runs/{run_id}/{table}/part-{index:05d}.parquet``."""
    return url(run_dir(root, run_id), validate_name(table, "table name"), f"part-{index:05d}.parquet")


def run_report(root: str, run_id: str) -> str:
    """A run's self-contained HTML report: ``{root}/runs/{run_id}/report.html``."""
    return url(run_dir(root, run_id), "report.html")


def run_manifest(root: str, run_id: str) -> str:
    """A run's provenance manifest: ``{root}/runs/{run_id}/manifest.json``."""
    return url(run_dir(root, run_id), "manifest.json")


def failure_log(root: str, run_id: str, stamp: str) -> str:
    """A failed job's remote traceback: ``{root}/runs/{run_id}/logs/failure-{stamp}.log``."""
    return url(run_dir(root, run_id), "logs", f"failure-{validate_name(stamp, 'log stamp')}.log")


def results_dir(root: str, results_key: str) -> str:
    """Shard results of one scoring setting, shared by every run with it: ``{root}/results/{results_key}``."""
    return url(root, "results", validate_name(results_key, "results key"))


def shared_shard_result(root: str, results_key: str, shard_id: str) -> str:
    """One shard's top-k under a scoring setting: ``{root}/results/{results_key}/{shard_id}.parquet``."""
    return url(results_dir(root, results_key), f"{validate_name(shard_id, 'shard id')}.parquet")


def store_dir(root: str, store_id: str) -> str:
    """One gradient store (`pipeline.store`): ``{root}/store/{store_id}``."""
    return url(root, "store", validate_name(store_id, "store id"))


def store_key_file(root: str, store_id: str) -> str:
    """What a store was written under: ``{root}/store/{store_id}/key.json``."""
    return url(store_dir(root, store_id), "key.json")


def store_basis(root: str, store_id: str) -> str:
    """The store's kept eigendirections: ``{root}/store/{store_id}/basis.safetensors``."""
    return url(store_dir(root, store_id), "basis.safetensors")


def store_shard(root: str, store_id: str, shard_id: str) -> str:
    """One shard's stored blocks: ``{root}/store/{store_id}/shards/{shard_id}.safetensors``."""
    return url(store_dir(root, store_id), "shards", f"{validate_name(shard_id, 'shard id')}.safetensors")


def store_queries(root: str, store_id: str, queries_id: str) -> str:
    """A query set's blocks in the store's basis: ``{root}/store/{store_id}/queries/{queries_id}.safetensors``."""
    return url(store_dir(root, store_id), "queries", f"{validate_name(queries_id, 'queries id')}.safetensors")


def factors_pin(root: str, settings_id: str) -> str:
    """The factors pinned for one fitting setting: ``{root}/factor_pins/{settings_id}.json``."""
    return url(root, "factor_pins", f"{validate_name(settings_id, 'factors settings id')}.json")


def catalog_dir(root: str) -> str:
    """The run catalog, one Parquet file per run (read by glob): ``{root}/catalog/runs``."""
    return url(root, "catalog", "runs")


def catalog_entry(root: str, run_id: str) -> str:
    """One run's catalog row: ``{root}/catalog/runs/{run_id}.parquet``."""
    return url(catalog_dir(root), f"{validate_name(run_id, 'run.id')}.parquet")


def run_diff(root: str, run_a: str, run_b: str) -> str:
    """The rows that entered, left or moved between two runs: ``{root}/diffs/{run_a}__vs__{run_b}.parquet``."""
    a, b = validate_name(run_a, "diff.run_a"), validate_name(run_b, "diff.run_b")
    return url(root, "diffs", f"{a}__vs__{b}.parquet")


def latest_pointer(root: str) -> str:
    """Pointer to the newest complete run, updated only after its merge commits: ``{root}/latest.json``."""
    return url(root, "latest.json")


# ---- measurements and probes ------------------------------------------------------------------


def benchmark_result(root: str, name: str) -> str:
    """A benchmark result: ``{root}/benchmarks/{name}.json``."""
    return url(root, "benchmarks", f"{validate_name(name, 'benchmark name')}.json")


def evaluation_result(root: str, name: str) -> str:
    """An evaluation result: ``{root}/evaluations/{name}.json``."""
    return url(root, "evaluations", f"{validate_name(name, 'evaluation name')}.json")


def write_probe(root: str, name: str) -> str:
    """Where `Storage.check_writable` writes and deletes its probe: ``{root}/_probe/{name}``."""
    return url(root, "_probe", validate_name(name, "probe name"))


# ---- commit markers ---------------------------------------------------------------------------


def file_marker(unit_url: str) -> str:
    """The commit marker of a file unit: ``{unit}.commit.json``."""
    return unit_url.rstrip("/") + FILE_MARKER_SUFFIX


def dir_marker(unit_url: str) -> str:
    """The commit marker of a folder unit: ``{unit}/_COMMITTED.json``."""
    return f"{unit_url.rstrip('/')}/{DIR_MARKER_NAME}"
