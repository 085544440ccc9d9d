"""Reliability (issue 10.1-10.4): verified commits, nothing deleted first, bounded waits, exit statuses, safe downloads.

Default tier: commit markers carry a checksum taken while writing; a unit
changed after its commit (same size), swapped for another unit's valid file or
marked before checksums is not committed; reads check the bytes against the
marker; the exit statuses of each error kind.

Integration tier (local Ray in this process, local storage, the small demo):
a corrupted and a swapped committed shard are recomputed on rerun (and only
they), a corrupted factors file is refit, each time to the uninterrupted run's
table row for row; stale shards are refused without ``run.overwrite``. Jobs
run as subprocesses: a secret given in ``storage.options`` appears in no file
the job writes; workers the cluster cannot place end the job with status 3 and
one line naming the ``cluster.*`` keys; an S3 server (moto, in its own
process) frozen with SIGSTOP ends the job with status 3 within the configured
timeout, and a rerun once it answers again finishes. A model key escaping the
cache folder is refused and nothing is written outside it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import layout
from pipeline.commit import (
    Commit,
    already_committed,
    commit_dir,
    commit_file,
    committed_checksum,
    read_dir_commit,
    read_file_commit,
)
from pipeline.config import (
    AttributeConfig,
    ClusterConfig,
    CorpusConfig,
    ModelConfig,
    QueriesConfig,
    RunConfig,
    ScoreConfig,
    StorageConfig,
)
from pipeline.errors import (
    BadInputError,
    ClusterError,
    ConfigError,
    CorruptUnitError,
    MergeRefusedError,
    StorageConfigError,
    StorageError,
    exit_status,
)
from pipeline.storage import Checksum, Storage, bounded_options
from tests.helpers import assert_identical_tables, aws_env_vars, read_table, scratch_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "root"))


def unit_url(storage: Storage, name: str) -> str:
    """A file unit's URL under the storage root (any path does: these tests are about markers)."""
    return layout.url(storage.root, "units", f"{name}.parquet")


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"doc_id": [f"d{i}" for i in range(start, start + n)], "score": [float(i) for i in range(n)]})


def _flip_same_size(path: str, offset: int | None = None, length: int = 16) -> None:
    """Overwrite ``length`` bytes in the middle of a file with their complement (size unchanged)."""
    with open(path, "r+b") as f:
        data = f.read()
        at = len(data) // 2 if offset is None else offset
        f.seek(at)
        f.write(bytes(255 - b for b in data[at : at + length]))


# ---- default tier: markers, verification, exit statuses ----------------------------------------


def test_commit_records_the_checksum_taken_while_writing(storage, monkeypatch):
    url = unit_url(storage, "s1")
    storage.write_parquet(url, _table(5))
    # The commit must not read the file back: the write already hashed the bytes it sent.
    monkeypatch.setattr(storage, "checksum", lambda u: pytest.fail(f"read back {u}"))
    record = commit_file(storage, url, num_rows=5)
    data = Path(url).read_bytes()
    assert record.checksum == Checksum.of(data)
    marker = storage.read_json(layout.file_marker(url))
    assert marker["sha256"] == Checksum.of(data).sha256 and marker["size_bytes"] == len(data)


def test_a_file_written_by_another_process_is_hashed_on_commit(storage):
    url = unit_url(storage, "s1")
    Storage(storage.root).write_bytes(url, b"written elsewhere")
    assert commit_file(storage, url).checksum == Checksum.of(b"written elsewhere")


def test_a_changed_or_swapped_unit_is_not_committed(storage, caplog):
    a, b = (unit_url(storage, s) for s in ("s1", "s2"))
    for url, start in ((a, 0), (b, 100)):
        storage.write_parquet(url, _table(5, start))
        commit_file(storage, url)
    assert read_file_commit(storage, a) is not None and already_committed(storage, b) is not None

    _flip_same_size(a)
    Path(b).write_bytes(Path(unit_url(storage, "s1")).read_bytes())  # s1's bytes: valid Parquet
    caplog.set_level(logging.WARNING, logger="pipeline")
    assert read_file_commit(storage, a) is None and already_committed(storage, b) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(a in m and "sha256" in m and "not committed" in m for m in warned), warned
    assert any(b in m for m in warned), warned
    # Without verification the marker is there (a caller that checks the bytes itself reads it).
    assert read_file_commit(storage, a, verify=False) is not None


def test_a_truncated_or_missing_unit_is_not_committed(storage):
    url = unit_url(storage, "s1")
    storage.write_parquet(url, _table(5))
    commit_file(storage, url)
    Path(url).write_bytes(Path(url).read_bytes()[:-10])
    assert read_file_commit(storage, url) is None
    os.remove(url)
    assert read_file_commit(storage, url) is None


def test_a_marker_without_checksum_is_not_committed(storage, caplog):
    url = unit_url(storage, "s1")
    storage.write_bytes(url, b"old data")
    storage.write_json(layout.file_marker(url), {"committed_at": "2026-01-01T00:00:00+00:00", "size_bytes": 8})
    caplog.set_level(logging.WARNING, logger="pipeline")
    assert read_file_commit(storage, url) is None
    assert "no checksum" in caplog.text
    with pytest.raises(CorruptUnitError, match="no checksum"):
        committed_checksum(storage, url)


def test_reads_check_the_bytes_against_the_marker(storage):
    url = layout.factors_file(storage.root, "f1")
    storage.write_bytes(url, bytes(range(256)) * 64)
    commit_file(storage, url)
    assert storage.read_bytes(url, committed_checksum(storage, url)) == bytes(range(256)) * 64
    _flip_same_size(url, offset=4096, length=8)
    with pytest.raises(CorruptUnitError, match="factors.safetensors") as e:
        storage.read_bytes(url, committed_checksum(storage, url))
    assert "rerun" in str(e.value)
    with pytest.raises(CorruptUnitError, match="not committed"):
        committed_checksum(storage, layout.factors_file(storage.root, "never"))


def test_a_folder_unit_checks_every_file(storage):
    d = layout.attribution_dir(storage.root, "r")
    storage.write_parquet(layout.attribution_part(storage.root, "r", 0), _table(3))
    storage.write_parquet(layout.attribution_part(storage.root, "r", 1), _table(4))
    record = commit_dir(storage, d, num_rows=7)
    assert set(record.files_sha256) == set(record.files) == {"part-00000.parquet", "part-00001.parquet"}
    assert read_dir_commit(storage, d) == record
    _flip_same_size(layout.attribution_part(storage.root, "r", 1))
    assert read_dir_commit(storage, d) is None


def test_marker_round_trip_keeps_checksums():
    record = Commit("t", size_bytes=3, sha256="ab" * 32, top_k=10)
    assert Commit.from_json(json.loads(json.dumps(record.to_json()))) == record
    folder = Commit("t", files={"a": 1}, files_sha256={"a": "cd" * 32})
    assert Commit.from_json(folder.to_json()).file_checksums() == {"a": Checksum(1, "cd" * 32)}


@pytest.mark.parametrize(
    "error, status",
    [(ConfigError("x"), 2), (BadInputError("x"), 2), (MergeRefusedError("x"), 2), (StorageConfigError("x"), 2),
     (StorageError("x"), 3), (CorruptUnitError("x"), 3), (ClusterError("x"), 3), (RuntimeError("x"), 1)],
)
def test_exit_status_by_kind(error, status):
    assert exit_status(error) == status


def test_bounded_options_add_timeouts_and_keep_the_users():
    opts = bounded_options({"endpoint_url": "http://h", "config_kwargs": {"read_timeout": 7}}, 3.0, 2)
    assert opts["endpoint_url"] == "http://h"
    assert opts["config_kwargs"] == {
        "read_timeout": 7, "connect_timeout": 3.0, "retries": {"total_max_attempts": 3, "mode": "standard"}
    }
    with pytest.raises(ConfigError, match="storage.timeout_s"):
        bounded_options({}, 0, 1)


def test_a_remote_failure_is_one_line_first_and_last_with_the_traceback_in_a_file(tmp_path, caplog):
    import ray

    from pipeline.jobs_common import exit_on_error

    storage = Storage(str(tmp_path / "root"))
    cause = ClusterError("no unit finished within cluster.stall_timeout_s=5")
    remote = ray.exceptions.RayTaskError("score", "Traceback (most recent call last):\n  File x\nremote frames",
                                         cause).as_instanceof_cause()
    with pytest.raises(SystemExit) as e, exit_on_error() as failure_log:
        failure_log.point_at(storage, layout.failure_log(storage.root, "r", "t1"))
        raise remote
    assert e.value.code == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == lines[-1] == f"ClusterError: {cause}"
    where = layout.failure_log(storage.root, "r", "t1")
    assert any(where in m for m in lines)
    assert "remote frames" in Path(where).read_text()
    assert not any("remote frames" in m for m in lines)


# ---- integration: local Ray, local storage ------------------------------------------------------

DOCS_PER_SHARD = 12


@pytest.fixture(scope="session")
def corpus(small_demo, shared_tmp):
    """The small demo's first 4 x DOCS_PER_SHARD documents, written once per test run in ``shared_tmp``
    (test_faults uses it too: both files' jobs then read one corpus and share `uninterrupted_job`)."""
    from filelock import FileLock

    path = shared_tmp / "reliability-corpus.parquet"
    with FileLock(str(shared_tmp / "reliability-corpus.lock")):
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            pq.write_table(pq.read_table(small_demo.corpus_path).slice(0, 4 * DOCS_PER_SHARD), tmp)
            os.replace(tmp, path)
    return str(path)


def make_cfg(small_demo, corpus, root, run_id="r", **run) -> AttributeConfig:
    return AttributeConfig(
        model=ModelConfig(path=small_demo.model_dir),
        corpus=CorpusConfig(path=corpus, docs_per_shard=DOCS_PER_SHARD),
        queries=QueriesConfig(path=small_demo.queries_path),
        storage=StorageConfig(root=root),
        run=RunConfig(id=run_id, **run),
        score=ScoreConfig(top_k=5),
        cluster=ClusterConfig(num_workers=1, cpus_per_worker=0.5, stall_timeout_s=600),
    )


@pytest.mark.integration
def test_placement_is_checked_against_the_nodes_and_waits_a_bounded_time(local_ray):
    from pipeline.cluster import check_placement, placeable_workers

    assert placeable_workers(ClusterConfig(cpus_per_worker=0.5))[0] == 2  # one CPU: two half-CPU workers
    check_placement(ClusterConfig(num_workers=2, cpus_per_worker=0.5))
    started = time.monotonic()
    with pytest.raises(ClusterError) as e:
        check_placement(ClusterConfig(num_workers=3, cpus_per_worker=0.5, placement_timeout_s=1.0))
    assert 1.0 <= time.monotonic() - started < 10
    message = str(e.value)
    for key in ("cluster.num_workers=3", "cluster.cpus_per_worker=0.5", "room for 2", "cluster.placement_timeout_s"):
        assert key in message, message


class Sleeper:
    """Stands in for a worker whose storage call hangs (a unit result, as a `Commit`, has ``num_docs``)."""

    def score(self, shard_id: str, seconds: float):
        import types

        time.sleep(seconds)
        return types.SimpleNamespace(shard_id=shard_id, num_docs=None)


@pytest.mark.integration
def test_a_stalled_stage_fails_naming_the_units_in_flight(local_ray, caplog):
    import ray

    from pipeline.cluster import run_units

    worker = ray.remote(Sleeper).options(num_cpus=0).remote()
    ray.get(worker.score.remote("warm", 0.0))  # started: the quick unit finishes, the stall is the stuck one's
    started = time.monotonic()
    caplog.set_level(logging.ERROR, logger="pipeline")
    with pytest.raises(ClusterError, match="cluster.stall_timeout_s=2") as e:
        run_units([worker], [("score", ("quick", 0.0)), ("score", ("stuck", 600.0))], "score", stall_timeout_s=2)
    assert time.monotonic() - started < 15
    assert "score" in str(e.value) and any("in flight" in r.getMessage() for r in caplog.records)
    ray.kill(worker)


@pytest.mark.integration
def test_the_stall_bound_is_per_shard_of_work_in_a_unit(local_ray):
    """A fit unit of k shards may run k x cluster.stall_timeout_s; the error names the setting and the k."""
    import ray

    from pipeline.cluster import run_units

    worker = ray.remote(Tagged).options(num_cpus=0).remote("w0")
    try:
        ray.get(worker.unit.remote(0.0))  # started: its start-up is not the unit's time
        got = run_units([worker], [("unit", (1.5,))], "fit", stall_timeout_s=1, shards_per_unit=2)
        assert [r.worker for r in got] == ["w0"]  # 1.5 s: over one shard's bound, within two shards'
        started = time.monotonic()
        with pytest.raises(ClusterError, match=r"cluster.stall_timeout_s=1 x 2 shards per unit"):
            run_units([worker], [("unit", (600.0,))], "fit", stall_timeout_s=1, shards_per_unit=2)
        assert 2 <= time.monotonic() - started < 15
    finally:
        ray.kill(worker)


class Tagged:
    """A worker that says which it is (``num_docs`` as a unit result has it)."""

    def __init__(self, name: str):
        self.name = name

    def unit(self, seconds: float):
        import types

        time.sleep(seconds)
        return types.SimpleNamespace(worker=self.name, num_docs=1)


@pytest.mark.integration
def test_units_go_to_idle_workers_before_any_worker_gets_a_second(local_ray):
    """Fewer units than slots (a fit on a two-shard sample) still run on as many workers as there are units."""
    import ray

    from pipeline.cluster import run_units

    workers = [ray.remote(Tagged).options(num_cpus=0).remote(f"w{i}") for i in range(3)]
    try:
        for units in (2, 3, 5):
            got = [r.worker for r in run_units(workers, [("unit", (0.5,))] * units, "fit", slots_per_worker=2)]
            counts = sorted(got.count(w) for w in ("w0", "w1", "w2"))
            assert counts == {2: [0, 1, 1], 3: [1, 1, 1], 5: [1, 2, 2]}[units], got
    finally:
        for w in workers:
            ray.kill(w)


def shard_results(root: str) -> dict[str, str]:
    """``{shard_id: file}`` of every committed shard result under ``root`` (file markers that record a top_k).

    Found through the markers, not the layout, so that where shard results live may change.
    """
    out = {}
    for marker in Path(root).rglob("*.parquet.commit.json"):
        info = json.loads(marker.read_text())["info"]
        if "top_k" in info:
            out[info["shard_id"]] = str(marker)[: -len(layout.FILE_MARKER_SUFFIX)]
    return dict(sorted(out.items()))


def commit_times(root: str) -> dict:
    """Every commit marker under ``root``: its ``committed_at``."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            if n.endswith(".commit.json") or n == "_COMMITTED.json":
                out[os.path.relpath(os.path.join(folder, n), root)] = json.loads(Path(folder, n).read_text())[
                    "committed_at"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(local_ray, small_demo, corpus, tmp_path_factory):
    """The reference: one run straight through."""
    from pipeline.run import run_attribution

    root = str(tmp_path_factory.mktemp("uninterrupted"))
    manifest = run_attribution(make_cfg(small_demo, corpus, root))
    return {"root": root, "manifest": manifest, "table": read_table(manifest["attribution"])}


def _copy_tree(src: str, dst: str) -> None:
    shutil.copytree(src, dst)


@pytest.mark.integration
def test_corrupted_and_swapped_shards_are_recomputed_to_the_same_table(uninterrupted, small_demo, corpus, tmp_path,
                                                                       caplog):
    from pipeline.run import run_attribution

    root = str(tmp_path / "root")
    _copy_tree(uninterrupted["root"], root)
    url = shard_results(root)
    shards = list(url)
    assert shards == sorted(uninterrupted["manifest"]["shards"])
    _flip_same_size(url[shards[1]])  # bytes changed, same size
    Path(url[shards[2]]).write_bytes(Path(url[shards[3]]).read_bytes())  # another shard's valid Parquet
    before = commit_times(root)

    caplog.set_level(logging.INFO, logger="pipeline")
    manifest = run_attribution(make_cfg(small_demo, corpus, root))
    after = commit_times(root)

    changed = {k for k in after if after[k] != before.get(k)}
    damaged = {os.path.relpath(layout.file_marker(url[s]), root) for s in shards[1:3]}
    table_marker = os.path.relpath(layout.dir_marker(manifest["attribution"]), root)
    # Exactly the damaged shards were recomputed; rescored to the same bytes, the table may be kept.
    assert damaged <= changed <= damaged | {table_marker}, changed
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for s in shards[1:3]:
        assert any(url[s] in m and "not committed" in m for m in warned), (s, warned)
    assert_identical_tables(read_table(manifest["attribution"]), uninterrupted["table"])


@pytest.mark.integration
def test_a_corrupted_factors_file_is_refit_not_used(uninterrupted, small_demo, corpus, tmp_path, caplog):
    from pipeline.run import run_attribution

    root = str(tmp_path / "root")
    _copy_tree(uninterrupted["root"], root)
    factors = layout.factors_file(root, uninterrupted["manifest"]["factors_id"])
    _flip_same_size(factors, length=4096)  # 4 KiB overwritten inside the committed file
    caplog.set_level(logging.INFO, logger="pipeline")
    manifest = run_attribution(make_cfg(small_demo, corpus, root))
    assert any(factors in r.getMessage() and "not committed" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert any(r.getMessage() == f"committed {factors}" for r in caplog.records), "the factors were not refit"
    assert read_file_commit(Storage(root), factors) is not None
    assert_identical_tables(read_table(manifest["attribution"]), uninterrupted["table"])


@pytest.mark.integration
def test_stale_shards_are_refused_without_overwrite_and_replaced_with_it(uninterrupted, small_demo, corpus,
                                                                        tmp_path):
    from pipeline.run import run_attribution

    root = str(tmp_path / "root")
    _copy_tree(uninterrupted["root"], root)
    cfg = make_cfg(small_demo, corpus, root)
    other = replace(cfg, score=replace(cfg.score, top_k=3))
    shard = next(iter(shard_results(root).values()))
    before = Path(shard).read_bytes()
    table_dir = uninterrupted["manifest"]["attribution"].replace(uninterrupted["root"], root)
    with pytest.raises(ConfigError, match="run.overwrite=true"):
        run_attribution(other)
    assert Path(shard).read_bytes() == before and read_file_commit(Storage(root), shard) is not None
    assert read_dir_commit(Storage(root), table_dir) is not None  # the committed table is untouched

    manifest = run_attribution(replace(other, run=replace(other.run, overwrite=True)))
    assert manifest["attribution"] == table_dir and read_dir_commit(Storage(root), table_dir) is not None
    assert max(read_table(table_dir).column("rank").to_pylist()) == 3


# ---- integration: the job as a subprocess ------------------------------------------------------------


def run_job(tmp_path: Path, *overrides: str, env: dict | None = None, timeout: int = 300):
    with scratch_env():
        full_env = dict(os.environ, HYDRA_FULL_ERROR="0", **(env or {}))
        started = time.perf_counter()
        proc = subprocess.run(  # one stream, so that "last line" means the last line printed
            [sys.executable, str(REPO / "jobs" / "attribute.py"), f"hydra.run.dir={tmp_path / 'hydra'}", *overrides],
            cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )
    return proc, time.perf_counter() - started


def job_inputs(small_demo, corpus) -> list[str]:
    return [f"model.path={small_demo.model_dir}", f"corpus.path={corpus}", f"queries.path={small_demo.queries_path}",
            f"corpus.docs_per_shard={DOCS_PER_SHARD}", "score.top_k=5", "cluster.num_workers=1",
            "cluster.local_num_cpus=1"]


@pytest.fixture(scope="session")
def uninterrupted_job(small_demo, corpus, shared_tmp):
    """The reference for jobs run as subprocesses: one job straight through, as a subprocess too.

    Run once per test run (in ``shared_tmp``, by the first process to ask;
    test_faults compares with it as well). Its storage options carry a
    made-up secret (``+storage.options.password``) that
    `test_a_secret_in_storage_options_is_written_nowhere` looks for in what the
    job printed and wrote. A job's driver starts with torch's default thread
    count, as every job compared with this one does, whatever tests in this
    process changed.
    """
    from filelock import FileLock

    work = shared_tmp / "uninterrupted-job"
    record = work / "job.json"
    with FileLock(str(shared_tmp / "uninterrupted-job.lock")):
        if not record.exists():
            if work.exists():  # a job that failed in another process: start again
                shutil.rmtree(work)
            run_dir, secret = work / "run", "sEcReT-" + uuid.uuid4().hex
            run_dir.mkdir(parents=True)
            out = run_dir / "out"
            proc, _ = run_job(run_dir, *job_inputs(small_demo, corpus), f"storage.root={out}", "run.id=reference",
                              f"+storage.options.password={secret}")
            assert proc.returncode == 0, proc.stdout
            tmp = record.with_suffix(".tmp")  # outside run_dir: the secret is looked for only in what the job wrote
            tmp.write_text(json.dumps({"root": str(out), "run_dir": str(run_dir), "secret": secret,
                                       "stdout": proc.stdout}))
            os.replace(tmp, record)  # written last: its presence means the job finished
    job = json.loads(record.read_text())
    manifest = json.loads((Path(job["root"]) / "runs" / "reference" / "manifest.json").read_text())
    return {**job, "manifest": manifest, "table": read_table(manifest["attribution"])}


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.integration
def test_a_secret_in_storage_options_is_written_nowhere(uninterrupted_job):
    secret, run_dir = uninterrupted_job["secret"], Path(uninterrupted_job["run_dir"])
    assert secret not in uninterrupted_job["stdout"]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and (run_dir / "hydra").exists()
    assert not (run_dir / "hydra" / ".hydra").exists()
    leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert "password" in uninterrupted_job["manifest"]["config"]["storage"]["options"]  # the key's name only


@pytest.mark.integration
def test_workers_that_cannot_be_placed_end_the_job_with_status_3(small_demo, corpus, tmp_path):
    proc, seconds = run_job(tmp_path, *job_inputs(small_demo, corpus), f"storage.root={tmp_path / 'out'}",
                            "cluster.gpus_per_worker=1", "run.id=noplace")
    output = proc.stdout
    assert proc.returncode == 3, output
    lines = nonempty_lines(output)
    last = lines[-1]
    for key in ("cluster.num_workers", "cluster.gpus_per_worker", "cluster.placement_timeout_s", "0 GPUs"):
        assert key in last, last
    assert "Traceback" not in output
    print(f"unplaceable: exit 3 after {seconds:.1f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_process(tmp_path):
    """moto's S3 server in its own process (so that it can be frozen), on loopback; yields (endpoint, pid)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint, proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_a_frozen_storage_server_ends_the_job_with_status_3(moto_process, uninterrupted_job, small_demo, corpus, tmp_path,
                                                            monkeypatch):
    import s3fs

    endpoint, pid = moto_process
    env = {k: v for k, v in aws_env_vars(endpoint, str(tmp_path)).items() if v is not None}
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    bucket = f"frozen-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=endpoint,
                           key="testing", secret="testing")
    fs.mkdir(bucket)
    args = [*job_inputs(small_demo, corpus), "storage=s3", f"storage.root=s3://{bucket}/attribution", "run.id=frozen",
            "storage.timeout_s=2", "storage.retries=1"]

    # Frozen before the job starts: the driver's first storage call times out.
    os.kill(pid, signal.SIGSTOP)
    try:
        proc, seconds = run_job(tmp_path, *args, env=env, timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
    output = proc.stdout
    assert proc.returncode == 3, output
    last = nonempty_lines(output)[-1]
    assert "StorageError" in last and "storage.timeout_s=2" in last and f"s3://{bucket}" in last, last
    assert "Traceback" not in output
    # (retries + 1) attempts of timeout_s each, plus the backoff and the job's start-up.
    assert seconds < 60, seconds
    print(f"frozen before the start: exit 3 after {seconds:.1f}s")

    # Frozen mid-run, once the first shard result is committed: a worker's (or the driver's) call times out.
    with scratch_env():
        job = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "attribute.py"), f"hydra.run.dir={tmp_path / 'hydra-mid'}", *args],
            cwd=tmp_path, env=dict(os.environ, HYDRA_FULL_ERROR="0", **env), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not [k for k in fs.find(f"{bucket}/attribution") if k.endswith(".parquet.commit.json")]:
                if job.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no shard committed while the job ran: {fs.find(bucket)}\n{job.communicate()[0]}")
                time.sleep(0.2)
            os.kill(pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            output, _ = job.communicate(timeout=120)
            seconds = time.monotonic() - frozen_at
        finally:
            os.kill(pid, signal.SIGCONT)
            if job.poll() is None:
                job.kill()
    assert job.returncode == 3, output
    last = nonempty_lines(output)[-1]
    assert last.startswith("[") and "Error: " in last and "Traceback" not in output, output[-3000:]
    print(f"frozen mid-run: exit 3 {seconds:.1f}s after the freeze; last line: {last}")

    # The server answers again: the rerun finishes, to the uninterrupted run's table.
    proc, _ = run_job(tmp_path, *args, env=env)
    assert proc.returncode == 0, proc.stdout
    table = read_table(f"s3://{bucket}/attribution/runs/frozen/attribution", filesystem=fs)
    assert_identical_tables(table, uninterrupted_job["table"])


@pytest.mark.integration
def test_model_keys_that_escape_the_cache_are_refused(s3_env, tmp_path):
    import boto3

    from pipeline.model_io import check_model_dir, local_model_dir

    bucket = s3_env.removeprefix("s3://")
    client = boto3.client("s3")
    for key in ("models/lm/config.json", "models/lm/model.safetensors"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    cache = tmp_path / "work" / "cache"
    # The control: a clean model folder downloads into the cache.
    assert Path(local_model_dir(f"{s3_env}/models/lm", str(cache))).is_relative_to(cache)

    for i, evil in enumerate(("../../../evil.pth", "/abs.pth", "sub/../../x.pth")):
        for key in ("config.json", "model.safetensors"):
            client.put_object(Bucket=bucket, Key=f"models/bad{i}/{key}", Body=b"{}")
        client.put_object(Bucket=bucket, Key=f"models/bad{i}/{evil}", Body=b"import os")
        with pytest.raises(BadInputError, match="outside the model cache"):
            check_model_dir(f"{s3_env}/models/bad{i}")
        with pytest.raises(BadInputError, match="outside the model cache"):
            local_model_dir(f"{s3_env}/models/bad{i}", str(cache))
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(cache)]
    assert not outside, outside
    assert not list(cache.rglob("*.pth"))


@pytest.mark.integration
def test_a_cache_folder_that_symlinks_out_is_refused(s3_env, tmp_path, monkeypatch):
    import boto3

    from pipeline.model_io import local_model_dir

    bucket = s3_env.removeprefix("s3://")
    client = boto3.client("s3")
    for key in ("models/lm/config.json", "models/lm/sub/weights.safetensors", "models/lm/model.safetensors"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    import tempfile

    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_with_symlink(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        os.symlink(elsewhere, os.path.join(folder, "sub"))  # planted: a folder on the way leads out of the cache
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_with_symlink)
    with pytest.raises(BadInputError, match="resolves outside"):
        local_model_dir(f"{s3_env}/models/lm", str(cache))
    assert not list(elsewhere.iterdir())
