"""Every shipped Hydra config composes against the schema and validates; bad overrides name their key.

Composition uses Hydra's compose API on the real ``conf/`` folder with the
schemas registered exactly as the jobs register them. Every option of every
config group that exists in ``conf/`` is composed (new options are picked up
automatically; those with mandatory ``???`` values get their overrides from
``REQUIRED``). The dataclasses hold every default: a composed config equals
them except where a YAML file states otherwise, and a YAML file states no
default again.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from pipeline.config import STAGES, AttributeConfig, register_configs, to_config

ROOT = Path(__file__).resolve().parents[2]
CONF = (ROOT / "conf").resolve()

# Overrides that options with mandatory (???) values need.
REQUIRED = {
    ("storage", "s3"): ["storage.root=s3://bucket/attribution"],
    ("model", "hf"): ["model.path=s3://bucket/models/lm", "corpus.path=s3://bucket/corpus/",
                      "queries.path=s3://bucket/queries.jsonl"],
}

# Keys an option states although they equal the dataclass default: the registered schema leaves them
# mandatory (pipeline.config.store_schema) so that the group's other option must give them.
MANDATORY_STATED = {("storage", "local"): {"root"}, ("model", "demo"): {"path"}}


def groups() -> list[str]:
    return sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def yaml_values(path: Path) -> dict:
    """What a YAML file states, without Hydra's own keys (an empty file states nothing)."""
    values = OmegaConf.to_container(OmegaConf.load(path)) or {}
    return {k: v for k, v in values.items() if k not in ("defaults", "hydra")}


def restated_defaults(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    """The keys of ``values`` (nested) whose value is the dataclass default anyway."""
    restated = []
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict) and value:
            restated += restated_defaults(value, defaults[key], f"{prefix}{key}.")
        elif key in defaults and value == defaults[key]:
            restated.append(prefix + key)
    return restated


def compose_attribute(overrides: list[str]) -> AttributeConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("attribute", overrides=overrides)
    return to_config(cfg)


def required_for(choice: dict[str, str]) -> list[str]:
    return [o for group, opt in choice.items() for o in REQUIRED.get((group, opt), [])]


def test_every_group_has_the_options_the_docs_promise():
    assert {"local", "s3"} <= set(options("storage"))
    assert {"local", "ray"} <= set(options("cluster"))
    assert {"default", "curvature"} <= set(options("projection"))
    assert {"demo", "hf"} <= set(options("model"))


def test_defaults_are_the_embedded_demo():
    cfg = compose_attribute([])
    assert cfg.uses_demo
    assert cfg.cluster.address == "" and cfg.storage.root == "outputs/attribution"
    assert cfg.run.id == "demo" and cfg.score.top_k >= 1
    # Projection off with rank-24 queries: the rule's choice on SmolLM2-135M (docs/figures.md).
    assert cfg.projection.dim == 0 and cfg.score.query_rank == 24
    assert cfg.factors.damping is None and cfg.factors.empirical_fisher is False
    # The default options choose nothing but what the schema holds.
    assert cfg == AttributeConfig()
    assert cfg.corpus.docs_per_shard == 128  # the demo's 645 documents make 6 shards (docs/figures.md runs)


def test_only_groups_with_alternatives_have_yaml():
    for group in groups():
        assert len(options(group)) >= 2, f"conf/{group}/ has one option: its values belong in pipeline/config.py"


@pytest.mark.parametrize("group, option", [(g, o) for g in groups() for o in options(g)])
def test_each_option_states_only_what_differs(group, option):
    values = yaml_values(CONF / group / f"{option}.yaml")
    defaults = asdict(getattr(AttributeConfig(), group))
    restated = set(restated_defaults(values, defaults)) - MANDATORY_STATED.get((group, option), set())
    assert not restated, f"conf/{group}/{option}.yaml restates the dataclass defaults of {sorted(restated)}"
    # Composed: the dataclass defaults, except what the option states (and its mandatory overrides).
    required = required_for({group: option})
    expected = asdict(AttributeConfig())
    expected[group].update(values)
    for override in required:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        expected[section][name] = value
    assert asdict(compose_attribute([f"{group}={option}", *required])) == expected


@pytest.mark.parametrize(
    "storage, cluster, projection, model",
    list(itertools.product(options("storage"), options("cluster"), options("projection"), options("model"))),
)
def test_every_combination_of_shipped_options_validates(storage, cluster, projection, model):
    choice = {"storage": storage, "cluster": cluster, "projection": projection, "model": model}
    overrides = [f"{g}={o}" for g, o in choice.items()] + required_for(choice)
    cfg = compose_attribute(overrides)
    cfg.validate()
    if projection == "off":
        assert cfg.projection.dim == 0
    if cluster == "ray":
        assert cfg.cluster.address and cfg.cluster.gpus_per_worker > 0
    if storage == "s3":
        assert cfg.storage.root.startswith("s3://")
    if model == "hf":
        assert cfg.model.path and not cfg.uses_demo


def test_groups_without_alternatives_are_set_by_key():
    cfg = compose_attribute(["corpus.docs_per_shard=7", "queries.path=", "factors.sample_shards=2",
                             "score.query_rank=3", "run.stages=[score,fit]"])
    assert cfg.uses_demo
    assert (cfg.corpus.docs_per_shard, cfg.factors.sample_shards, cfg.score.query_rank) == (7, 2, 3)
    assert cfg.run.stages == ["score", "fit"]
    assert compose_attribute([]).run.stages == list(STAGES)


@pytest.mark.parametrize("option, key", [("storage=s3", "storage.root"), ("model=hf", "model.path")])
def test_mandatory_values_must_be_given(option, key):
    # Not silently replaced by the schema's default (a local root; the demo model).
    with pytest.raises(ValueError, match="missing mandatory value") as e:
        compose_attribute([option])
    assert key in str(e.value)


def test_model_path_alone_is_not_enough():
    with pytest.raises(ValueError, match="corpus.path"):
        compose_attribute(["model=hf", "model.path=/models/lm"])


def test_contract_keys_keep_their_names():
    cfg = compose_attribute(
        ["model.path=/m", "corpus.path=/c", "queries.path=/q", "storage.root=s3://b/p", "run.id=nightly-2026-11-22",
         "score.top_k=7", "projection.dim=0", "factors.damping=0.01", "factors.empirical_fisher=true",
         "cluster.address=auto"]
    )
    assert (cfg.model.path, cfg.corpus.path, cfg.queries.path) == ("/m", "/c", "/q")
    assert cfg.storage.root == "s3://b/p" and cfg.run.id == "nightly-2026-11-22"
    assert cfg.score.top_k == 7 and cfg.projection.dim == 0
    assert cfg.factors.damping == 0.01 and cfg.factors.empirical_fisher is True
    assert cfg.cluster.address == "auto"
    assert cfg.influence().projection.enabled is False and cfg.influence().damping == 0.01
    assert compose_attribute(["factors.damping=null"]).factors.damping is None


@pytest.mark.parametrize(
    "override, key",
    [
        ("score.top_k=0", "score.top_k"),
        ("projection.mode=foo", "projection.mode"),
        ("projection.dim=-1", "projection.dim"),
        ("factors.damping=-1", "factors.damping"),
        ("run.stages=[bogus]", "run.stages"),
        ("run.stages=[fit,scor]", "run.stages"),
        ("run.stages=[]", "run.stages"),
        ("cluster.num_workers=0", "cluster.num_workers"),
        ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker"),
        ("corpus.window=1", "corpus.window"),
        ("corpus.docs_per_shard=0", "corpus.docs_per_shard"),
        ("score.batch_size=0", "score.batch_size"),
        ("score.product_dtype=float16", "score.product_dtype"),
        ("model.precision=fp8", "model.precision"),
        ("model.precision=bf16", "model.precision"),
        ("run.id=../x", "run.id"),
        ("run.id=a/b", "run.id"),
        ("run.id=.hidden", "run.id"),
    ],
)
def test_bad_values_raise_naming_the_key(override, key):
    with pytest.raises(ValueError) as e:
        compose_attribute([override])
    assert key in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [("score.top_k=ten", "top_k"), ("cluster.num_workers=1.5", "num_workers"),
     ("factors.empirical_fisher=maybe", "empirical_fisher"), ("factors.damping=lots", "factors.damping"),
     ("factors.damping=true", "factors.damping"), ("run.stages=fit", "run.stages")],
)
def test_wrong_types_are_refused_by_the_schema(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        compose_attribute([override])
    text = str(e.value) + str(e.value.__cause__ or "")
    assert key in text


@pytest.mark.parametrize("override", ["score.topk=3", "cluster.adress=auto", "storage.rot=/x"])
def test_misspelled_keys_are_refused(override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ConfigCompositionException, ConfigAttributeError, ConfigKeyError)) as e:
        compose_attribute([override])
    text = str(e.value) + str(e.value.__cause__ or "")
    assert override.lstrip("+").split("=")[0].split(".")[-1] in text


def test_storage_options_are_not_written_into_manifests():
    cfg = compose_attribute(["+storage.options.secret=hunter2", "+storage.options.endpoint_url=http://x"])
    assert cfg.storage.options["secret"] == "hunter2"
    assert "hunter2" not in str(cfg.to_json())


# ---- the other jobs' configs --------------------------------------------------------------------


def load_job(name: str):
    """``jobs/{name}.py`` as a module: it registers its schema and names its ``to_config``, as the job does."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["benchmark", "evaluate"])
def test_other_job_configs_are_their_dataclass_defaults_except_what_the_yaml_states(name):
    job = load_job(name)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        obj = job.to_config(compose(name))
    values = yaml_values(CONF / f"{name}.yaml")
    defaults = asdict(type(obj)())
    assert not restated_defaults(values, defaults), f"conf/{name}.yaml restates dataclass defaults"
    expected = OmegaConf.merge(defaults, {"storage": yaml_values(CONF / "storage" / "local.yaml")}, values)
    assert asdict(obj) == OmegaConf.to_container(expected)
