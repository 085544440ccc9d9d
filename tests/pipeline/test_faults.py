"""Faults a cluster sees (issue 10): the driver killed mid-score, two drivers on one run id, a full disk.

Integration tier. Each job runs as a subprocess of ``jobs/attribute.py`` on
the small demo with local storage (the fixtures and helpers of
``test_reliability``). After each fault the table equals an uninterrupted
run's, row for row, and what was recomputed is what had to be (from the
manifest's ``counts``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import assert_identical_tables, read_table, scratch_env
from tests.pipeline.test_reliability import (  # noqa: F401 (fixtures)
    REPO,
    commit_times,
    corpus,
    job_inputs,
    nonempty_lines,
    run_job,
    shard_results,
    uninterrupted_job,
)

pytestmark = pytest.mark.integration

NUM_SHARDS = 4  # test_reliability's corpus: 4 x DOCS_PER_SHARD documents
# Where committed units live under storage.root (pipeline.layout): kept as they are by a rerun.
UNIT_FOLDERS = ("factors", "queries", "results")


def start_job(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    """``jobs/attribute.py`` in a session of its own (its local Ray's processes too), output to one pipe."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "attribute.py"), f"hydra.run.dir={tmp_path / ('hydra-' + name)}",
         *overrides],
        cwd=tmp_path, env=dict(os.environ, HYDRA_FULL_ERROR="0"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def kill_processes_with_home(home: str) -> None:
    """SIGKILL every process whose HOME is ``home``, and wait until they are gone."""
    import psutil

    procs = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HOME") == home:
                proc.kill()
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(procs, timeout=30)


def manifest_of(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / "manifest.json").read_text())


def test_a_driver_killed_mid_score_reruns_to_the_same_table(uninterrupted_job, small_demo, corpus, tmp_path):
    out = tmp_path / "out"
    args = [*job_inputs(small_demo, corpus), f"storage.root={out}", "run.id=killed"]
    with scratch_env() as scratch:
        job = start_job(tmp_path, "killed", *args)
        try:
            deadline = time.monotonic() + 240
            while not shard_results(str(out)):
                if job.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no shard committed while the job ran:\n{job.communicate()[0]}")
                time.sleep(0.05)
        finally:
            # The driver's machine dies: the driver and every process of the local Ray it started (its workers
            # are in sessions of their own; they share the job's scratch HOME).
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
            kill_processes_with_home(os.path.join(scratch, "home"))
    before = shard_results(str(out))
    assert 1 <= len(before) <= NUM_SHARDS and not (out / "runs" / "killed" / "manifest.json").exists()
    units_before = {k: t for k, t in commit_times(str(out)).items() if k.split("/")[0] in UNIT_FOLDERS}

    proc, _ = run_job(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout
    manifest = manifest_of(out, "killed")
    # Only the shards without a committed result were scored again.
    assert manifest["counts"]["shards_reused"] == len(before), manifest["counts"]
    assert manifest["counts"]["shards_scored"] == NUM_SHARDS - len(before), manifest["counts"]
    units_after = commit_times(str(out))
    assert {k: units_after.get(k) for k in units_before} == units_before  # factors, queries, results: not redone
    assert_identical_tables(read_table(manifest["attribution"]), uninterrupted_job["table"])
    print(f"driver killed after {len(before)} of {NUM_SHARDS} shards; the rerun scored the rest")


def test_two_drivers_on_one_run_id_end_with_one_whole_table(uninterrupted_job, small_demo, corpus, tmp_path):
    out = tmp_path / "out"
    args = [*job_inputs(small_demo, corpus), f"storage.root={out}", "run.id=twice"]
    with scratch_env():
        jobs = [start_job(tmp_path, name, *args) for name in ("first", "second")]
        outputs = [job.communicate(timeout=300)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output
    manifest = manifest_of(out, "twice")
    # Each shard has one committed result (the later writer replaced the earlier one's file whole).
    assert len(shard_results(str(out))) == NUM_SHARDS
    results_dir = Path(manifest["results"]["url"])
    assert len(list(results_dir.glob("*.parquet"))) == NUM_SHARDS
    assert_identical_tables(read_table(manifest["attribution"]), uninterrupted_job["table"])


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere), unmounted after the test; yields its path."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_in_one_line_and_the_rerun_after_it_is_freed_finishes(uninterrupted_job, small_demo, corpus,
                                                                               tmp_path, small_disk):
    args = [*job_inputs(small_demo, corpus), f"storage.root={small_disk / 'out'}", "run.id=full"]
    proc, _ = run_job(tmp_path, *args)
    output = proc.stdout
    assert proc.returncode == 3, output
    last = nonempty_lines(output)[-1]
    assert "StorageError" in last and "No space left on device" in last and str(small_disk) in last, last
    assert "Traceback" not in output
    assert not (small_disk / "out" / "runs" / "full" / "manifest.json").exists()
    print(f"disk full: {last}")

    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    proc, _ = run_job(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout
    manifest = manifest_of(small_disk / "out", "full")
    assert_identical_tables(read_table(manifest["attribution"]), uninterrupted_job["table"])
