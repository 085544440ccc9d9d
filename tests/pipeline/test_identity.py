"""Content-addressed ids: one frozen key per artefact, hashed into its id and stored in its metadata."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from pipeline.config import ProjectionConfig
from pipeline.core.ekfac import FactorsMeta
from pipeline.core.influence import InfluenceConfig
from pipeline.core.projection import ProjectionSpec
from pipeline.identity import FactorsKey, QueriesKey, digest

CURVATURE = InfluenceConfig(projection=ProjectionSpec(16, 3, "curvature"), damping=0.5, query_rank=2, seed=7)
SKETCH = InfluenceConfig(projection=ProjectionSpec(16, 3, "sketch"))


def factors_key(influence: InfluenceConfig = CURVATURE) -> FactorsKey:
    return FactorsKey.of(influence, "model-fp", 64, ["s-1", "s-2"])


def test_factors_key_reads_the_influence_config():
    key = factors_key()
    assert (key.fisher, key.space, key.projection, key.seed) == ("sampled", "projected", CURVATURE.projection, 7)
    assert key.shards == ("s-1", "s-2")
    # Sketch mode fits on full-size vectors: the projection does not determine the factors.
    assert factors_key(SKETCH).space == "full" and factors_key(SKETCH).projection is None
    assert factors_key(replace(SKETCH, empirical_fisher=True)).fisher == "empirical"


@pytest.mark.parametrize("key", [factors_key(), factors_key(SKETCH),
                                 QueriesKey.of(CURVATURE, "f-abc", "queries-fp", 64)])
def test_the_id_is_the_hash_of_the_keys_json_and_round_trips(key):
    prefix = "f-" if isinstance(key, FactorsKey) else "q-"
    assert key.id == prefix + digest(key.to_json())
    assert type(key).from_json(key.to_json()) == key
    hash(key)  # frozen: usable as a dict key


@pytest.mark.parametrize(
    "change",
    [{"model": "other"}, {"modules": ".*attn.*"}, {"fisher": "empirical"}, {"space": "full"},
     {"projection": ProjectionSpec(8, 3, "curvature")}, {"window": 32}, {"seed": 8}, {"shards": ("s-1",)},
     {"products": "bfloat16"}, {"eigh": "float32"}, {"precision": "float64"}],
)
def test_every_input_of_the_factors_key_changes_the_id(change):
    assert set(change) <= {f.name for f in fields(FactorsKey)}
    assert replace(factors_key(), **change).id != factors_key().id


@pytest.mark.parametrize(
    "change",
    [{"factors": "f-other"}, {"queries": "other"}, {"damping": None}, {"projection": ProjectionSpec(8, 3)},
     {"query_rank": 0}, {"window": 32}, {"products": "bfloat16"}],
)
def test_every_input_of_the_queries_key_changes_the_id(change):
    key = QueriesKey.of(CURVATURE, "f-abc", "queries-fp", 64)
    assert replace(key, **change).id != key.id


def test_bfloat16_fit_products_enter_the_factors_id_and_float32_keeps_it():
    plain = factors_key()
    assert "products" not in plain.to_json()  # float32: the id factors had before the setting existed
    bf16 = factors_key(replace(CURVATURE, fit_product_dtype="bfloat16"))
    assert bf16.products == "bfloat16" and bf16.id != plain.id
    assert FactorsKey.from_json(bf16.to_json()) == bf16
    # float64 references multiply in float64 whatever the setting says
    assert factors_key(replace(CURVATURE, fit_product_dtype="bfloat16", precision="float64")).id == \
        factors_key(replace(CURVATURE, precision="float64")).id


def test_the_factors_metadata_stores_the_key_its_id_hashes():
    key = factors_key()
    meta = FactorsMeta("model-fp", CURVATURE.modules, {}, key.fisher, key.space, extra=key.metadata())
    stored = FactorsMeta.from_json(meta.to_json()).extra
    assert stored["factors_id"] == key.id
    assert FactorsKey.from_json(stored["key"]) == key


def test_float32_eigendecompositions_and_precision_enter_the_factors_id():
    plain = factors_key()
    assert "eigh" not in plain.to_json() and "precision" not in plain.to_json()  # the ids of earlier factors
    f32 = factors_key(replace(CURVATURE, eigh_dtype="float32"))
    assert f32.eigh == "float32" and f32.id != plain.id
    assert FactorsKey.from_json(f32.to_json()) == f32
    # float64 references decompose in float64 whatever the setting says, and are not reused at float32
    f64 = factors_key(replace(CURVATURE, precision="float64"))
    assert factors_key(replace(CURVATURE, eigh_dtype="float32", precision="float64")).id == f64.id
    assert f64.to_json()["precision"] == "float64" and f64.id != plain.id
    assert FactorsKey.from_json(f64.to_json()) == f64


def test_bfloat16_range_finder_products_enter_the_queries_id_only_where_they_are_used():
    plain = QueriesKey.of(CURVATURE, "f-abc", "queries-fp", 64)
    assert "products" not in plain.to_json()  # float32: the id queries had before the setting existed
    bf16 = QueriesKey.of(replace(CURVATURE, product_dtype="bfloat16"), "f-abc", "queries-fp", 64)
    assert bf16.products == "bfloat16" and bf16.id != plain.id
    assert QueriesKey.from_json(bf16.to_json()) == bf16
    # dense queries have no range finder; float64 references multiply in float64 whatever the setting says
    for influence in (replace(CURVATURE, query_rank=0), replace(CURVATURE, precision="float64")):
        assert QueriesKey.of(replace(influence, product_dtype="bfloat16"), "f-abc", "queries-fp", 64).id == \
            QueriesKey.of(influence, "f-abc", "queries-fp", 64).id


def test_a_disabled_projections_mode_and_seed_leave_the_queries_id():
    off = [replace(CURVATURE, projection=ProjectionSpec(0, seed, mode))
           for seed in (0, 5) for mode in ("curvature", "sketch")]
    keys = {QueriesKey.of(influence, "f-abc", "queries-fp", 64) for influence in off}
    assert len(keys) == 1
    # the config's default keeps the id it had before the normalisation
    (key,) = keys
    default = ProjectionConfig()
    assert key.projection == ProjectionSpec(default.dim, default.seed, default.mode)
    assert QueriesKey.of(replace(CURVATURE, projection=ProjectionSpec(16, 5, "sketch")), "f-abc", "queries-fp", 64).id \
        != QueriesKey.of(replace(CURVATURE, projection=ProjectionSpec(16, 3, "sketch")), "f-abc", "queries-fp", 64).id
