"""The cluster manifests (infra/) and the image (docker/Dockerfile) would apply and run as written.

No Kubernetes or Docker engine here: the manifests are parsed and checked
against what a real cluster needs (a pinned image, the one docker/Dockerfile
builds; no two nights at once; GPUs not held after a job; memory-backed
/dev/shm and a model cache where ``model.cache_dir`` points), and every
entrypoint's command line is taken apart and its Hydra overrides composed
against the shipped ``conf/`` with the job's own schema, then validated, as the
job itself would at 02:00.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MANIFESTS = sorted((ROOT / "infra").glob("*.yaml"))
# The image's WORKDIR: /app/... in a manifest is this repository's file.
IMAGE_ROOT = "/app/"
# Seconds a finished job's cluster may keep its GPUs.
MAX_TTL_S = 300
DAY_S = 86_400
# What the tests put in place of the shell's date substitution.
NIGHT = "2026-11-22"
SHELL_DATE = re.compile(r"\$\(date[^)]*\)|\$\{?night\}?")


def docs() -> list[tuple[str, dict]]:
    """Every document of every manifest, with its file name."""
    return [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in docs() if d["kind"] == kind]


def walk(node, key: str):
    """Every value under ``key`` anywhere in a nested manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def documented_image() -> str:
    (image,) = re.findall(r"^# IMAGE: (\S+)$", DOCKERFILE.read_text(), re.M)
    return image


def base_image() -> str:
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)
    return base


def ray_cluster_specs() -> list[dict]:
    """The RayCluster specs: standalone, inside a RayJob, inside a RayCronJob's job template."""
    specs = [d["spec"] for d in of_kind("RayCluster")]
    specs += [d["spec"]["rayClusterSpec"] for d in of_kind("RayJob")]
    specs += [d["spec"]["jobTemplate"]["rayClusterSpec"] for d in of_kind("RayCronJob")]
    return specs


def ray_pod_specs() -> list[dict]:
    pods = []
    for spec in ray_cluster_specs():
        pods.append(spec["headGroupSpec"]["template"]["spec"])
        pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return pods


def entrypoints() -> list[tuple[str, str]]:
    """``(manifest kind, command line)`` of every job the manifests run."""
    found = [("RayCronJob", d["spec"]["jobTemplate"]["entrypoint"]) for d in of_kind("RayCronJob")]
    found += [("RayJob", d["spec"]["entrypoint"]) for d in of_kind("RayJob")]
    for d in of_kind("CronJob"):
        for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            found.append(("CronJob", " ".join(c.get("command", []) + c.get("args", []))))
    return found


def schedule_period_s(schedule: str) -> int:
    """The period of a cron schedule this project uses: daily (``M H * * *``); anything else is refused."""
    minute, hour, dom, month, dow = schedule.split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*"), (
        f"schedule {schedule!r}: the tests know daily schedules only; teach schedule_period_s the new one"
    )
    return DAY_S


def parse_submission(command: str) -> dict:
    """A command line taken apart: the ``ray job submit`` options (if any), the script, config name, overrides."""
    words = shlex.split(SHELL_DATE.sub(NIGHT, command))
    submit = {}
    if "submit" in words and "--" in words:
        cut = words.index("--")
        options = words[words.index("submit") + 1:cut]
        submit = dict(zip(options[::2], options[1::2]))
        words = words[cut + 1:]
    python = next(i for i, w in enumerate(words) if re.fullmatch(r"python3?(\.\d+)?", w.rsplit("/", 1)[-1]))
    script, rest = words[python + 1], words[python + 2:]
    config_name = None
    if "--config-name" in rest:
        i = rest.index("--config-name")
        config_name, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    overrides = [w for w in rest if w not in ("&&", ";")]
    assert all("=" in o for o in overrides), f"not a Hydra override in {overrides}"
    return {"submit": submit, "script": script, "config_name": config_name, "overrides": overrides}


def load_job(path: Path):
    """The job's module (it registers its schema when imported, as when it runs) and its default config name."""
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (default,) = re.findall(r'config_name="(\w+)"', path.read_text())
    return module, default


def compose_entrypoint(command: str):
    """The validated config the command's job would run with (its schema, ``conf/``, its overrides)."""
    parsed = parse_submission(command)
    job, default = load_job(ROOT / parsed["script"][len(IMAGE_ROOT):])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(parsed["config_name"] or default, overrides=parsed["overrides"])
    return job.to_config(cfg)  # the job's own conversion: refuses missing values, validates


# ---- the image ---------------------------------------------------------------------------------


def test_dockerfile_pins_its_base_and_torch():
    text = DOCKERFILE.read_text()
    base = base_image()
    assert ":" in base and not base.endswith(":latest"), f"docker/Dockerfile's base {base!r} is not pinned"
    assert re.search(r'"torch==\d+\.\d+\.\d+"', text), "docker/Dockerfile must pin torch (torch==x.y.z)"
    assert "torch>=" not in text
    # The torch build is checked against the base image's CUDA at build time.
    cuda = re.search(r"-cu(\d+)$", base).group(1)
    assert f"startswith('{cuda[:-1]}.{cuda[-1]}')" in text
    assert "import pipeline.run" in text  # the smoke check stays
    assert re.search(r"^WORKDIR /app$", text, re.M) and IMAGE_ROOT == "/app/"


def test_documented_image_is_pinned_to_the_package_version():
    image = documented_image()
    name, tag = image.rsplit(":", 1)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert tag == version, f"docker/Dockerfile documents {image}; tag it with the package version {version}"
    assert f"-t {image} ." in DOCKERFILE.read_text()


# ---- the manifests -----------------------------------------------------------------------------


def test_manifests_parse_and_cover_both_schedules():
    kinds = {d["kind"] for _, d in docs()}
    assert {"RayCluster", "RayCronJob", "CronJob"} <= kinds
    for name, d in docs():
        assert d["apiVersion"] == ("batch/v1" if d["kind"] == "CronJob" else "ray.io/v1"), name
        assert d["metadata"]["name"], name


def test_every_image_is_the_pinned_one_the_dockerfile_builds():
    image = documented_image()
    for name, d in docs():
        images = list(walk(d, "image"))
        assert images, f"{name} names no image"
        for found in images:
            assert not found.endswith(":latest") and ":" in found.rsplit("/", 1)[-1], f"{name}: {found} is not pinned"
            assert found.split("@", 1)[0] == image, f"{name} runs {found}; docker/Dockerfile builds {image}"


def test_ray_version_matches_the_base_image():
    ray_version = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", base_image()).group(1)
    for spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_version


def test_raycronjob_states_its_feature_gate_and_never_overlaps_or_idles():
    text = (ROOT / "infra" / "rayjob-nightly.yaml").read_text()
    assert "KubeRay >= 1.6.0" in text and "feature gate RayCronJob" in text
    assert "cronjob-nightly.yaml" in text  # the alternative for older KubeRay
    for d in of_kind("RayCronJob"):
        job = d["spec"]["jobTemplate"]
        assert job["shutdownAfterJobFinishes"] is True
        assert 0 <= job["ttlSecondsAfterFinished"] <= MAX_TTL_S
        # No concurrencyPolicy in the RayCronJob CRD: a night is stopped before the next one starts.
        assert 0 < job["activeDeadlineSeconds"] < schedule_period_s(d["spec"]["schedule"])
        assert "concurrencyPolicy" not in d["spec"]  # not a field of RayCronJobSpec (KubeRay 1.6, 1.7)


def test_cronjob_forbids_concurrency_and_submits_to_the_long_lived_cluster():
    clusters = {d["metadata"]["name"] for d in of_kind("RayCluster")}
    for d in of_kind("CronJob"):
        spec = d["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        job = spec["jobTemplate"]["spec"]
        assert 0 < job["activeDeadlineSeconds"] < schedule_period_s(spec["schedule"])
        assert 0 <= job["ttlSecondsAfterFinished"] <= 3600
        (command,) = [c for kind, c in entrypoints() if kind == "CronJob"]
        submit = parse_submission(command)["submit"]
        head = re.fullmatch(r"http://([a-z0-9-]+)-head-svc:8265", submit["--address"])
        assert head and head.group(1) in clusters, f"{submit['--address']} is no RayCluster's head service"
        assert submit["--submission-id"] == f"nightly-{NIGHT}"


def test_ray_pods_mount_shm_in_memory_and_the_model_cache():
    cache_dirs = {compose_entrypoint(c).model.cache_dir for _, c in entrypoints()}
    assert len(cache_dirs) == 1, f"the entrypoints cache models in different folders: {cache_dirs}"
    (cache_dir,) = cache_dirs
    for pod in ray_pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", container["name"]
            assert cache_dir in mounts, f"{container['name']} mounts no model cache at {cache_dir}"
            cache = volumes[mounts[cache_dir]]
            assert "hostPath" in cache or "persistentVolumeClaim" in cache or "ephemeral" in cache



def _quantity_bytes(q: str) -> float:
    """A Kubernetes quantity such as ``100Gi`` or ``50G`` in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?)?", str(q))
    assert m, f"not a quantity: {q!r}"
    units = {None: 1, **{p + "i": 1024 ** (i + 1) for i, p in enumerate("KMGTP")},
             **{p: 1000 ** (i + 1) for i, p in enumerate("KMGTP")}}
    return float(m.group(1)) * units[m.group(2)]


def test_ray_pods_spool_to_a_disk_backed_tmpdir_they_request():
    # The factors are copied to TMPDIR by precondition workers and spooled there by the driver
    # (Storage.read_mapped / write_stream): a disk volume whose size the scheduler accounts for.
    for pod in ray_pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert "TMPDIR" in env, f"{container['name']} sets no TMPDIR"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert env["TMPDIR"] in mounts, f"{container['name']}: TMPDIR {env['TMPDIR']} is no mounted volume"
            scratch = volumes[mounts[env["TMPDIR"]]]["emptyDir"]
            assert scratch.get("medium") != "Memory", f"{container['name']}: TMPDIR is memory-backed"
            requested = container["resources"]["requests"]["ephemeral-storage"]
            assert _quantity_bytes(requested) >= _quantity_bytes(scratch["sizeLimit"]) >= 1 << 30

# ---- the entrypoints ---------------------------------------------------------------------------


def test_there_are_entrypoints_to_check():
    assert {kind for kind, _ in entrypoints()} >= {"RayCronJob", "CronJob"}


@pytest.mark.parametrize("kind, command", entrypoints())
def test_entrypoint_runs_a_file_of_the_image_by_absolute_path(kind, command):
    script = parse_submission(command)["script"]
    assert script.startswith(IMAGE_ROOT), f"{kind}: {script} is not an absolute path in the image"
    assert (ROOT / script[len(IMAGE_ROOT):]).is_file(), f"{kind}: {script} is not in the repository"


@pytest.mark.parametrize("kind, command", entrypoints())
def test_entrypoint_overrides_compose_and_validate(kind, command):
    cfg = compose_entrypoint(command)
    assert cfg.run.id == f"nightly-{NIGHT}"
    assert cfg.cluster.address == "auto" and cfg.cluster.gpus_per_worker > 0
    assert cfg.storage.root.startswith("s3://") and cfg.model.path.startswith("s3://")
    assert not cfg.uses_demo and cfg.corpus.path and cfg.queries.path


def test_nightly_entrypoints_agree():
    """The RayCronJob and the CronJob run the same night with the same config."""
    configs = [compose_entrypoint(c) for _, c in entrypoints()]
    assert all(c == configs[0] for c in configs[1:])


def test_a_misspelled_override_in_an_entrypoint_is_caught():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    (_, command), *_ = entrypoints()
    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)):
        compose_entrypoint(command.replace("corpus.path=", "corpus.pth="))
    with pytest.raises(ValueError, match="missing mandatory value"):
        compose_entrypoint(re.sub(r"storage\.root=\S+", "", command))


def test_nightly_config_has_a_dated_default_run_id():
    job, _ = load_job(ROOT / "jobs" / "attribute.py")
    required = ["storage.root=s3://b/a", "model.path=s3://b/m", "corpus.path=s3://b/c/", "queries.path=s3://b/q.jsonl"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = job.to_config(compose("nightly", overrides=required))
    assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", cfg.run.id)
