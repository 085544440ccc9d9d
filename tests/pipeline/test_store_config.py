"""The gradient store's keys and refusals without Ray: config validation, a file of another key, commit rules."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pipeline import layout
from pipeline.commit import commit_file, read_file_commit
from pipeline.config import AttributeConfig, ConfigError, ProjectionConfig, ScoreConfig, StoreConfig
from pipeline.core.store import StoreBasis
from pipeline.results import ResultsKey
from pipeline.storage import Storage
from pipeline.store import StoreKey, StoreMismatchError, read_basis


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(score=ScoreConfig(source="cache")), "score.source"),
        (dict(store=StoreConfig(dtype="int8")), "store.dtype"),
        (dict(store=StoreConfig(dim=0)), "store.dim"),
        (dict(store=StoreConfig(enabled=True), projection=ProjectionConfig(dim=8, mode="sketch")), "sketch"),
        (dict(score=ScoreConfig(source="store"), store=StoreConfig(rescore=-1)), "store.rescore"),
        (dict(store=StoreConfig(rescore=20)), "score.source=store"),
        (dict(score=ScoreConfig(source="store", top_k=10), store=StoreConfig(rescore=5)), "score.top_k=10"),
    ],
)
def test_bad_store_settings_are_refused_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        replace(AttributeConfig(), **change).validate()


def test_store_settings_that_make_sense_validate():
    replace(AttributeConfig(), store=StoreConfig(enabled=True, dim=8, dtype="float16")).validate()
    replace(AttributeConfig(), score=ScoreConfig(source="store"),
            projection=ProjectionConfig(dim=16, mode="curvature")).validate()
    replace(AttributeConfig(), score=ScoreConfig(source="store", top_k=10), store=StoreConfig(rescore=10)).validate()


def test_exact_results_keep_their_key_and_store_results_get_another():
    exact = ResultsKey("q-1", 10, 8, "float32", 5)
    assert "store" not in exact.to_json()
    # The key of exact results is what it was before the store existed (its JSON has the same fields).
    assert set(exact.to_json()) == {"queries", "top_k", "batch_size", "precision", "token_rows", "format"}
    assert replace(exact, store="g-abc").id != exact.id


def test_bfloat16_products_key_results_apart_and_float32_keeps_the_key():
    exact = ResultsKey("q-1", 10, 8, "float32", 5)
    assert replace(exact, product_dtype="float32").id == exact.id  # left out of the JSON
    assert replace(exact, product_dtype="bfloat16").to_json()["product_dtype"] == "bfloat16"
    assert replace(exact, product_dtype="bfloat16").id != exact.id


def test_two_stage_results_are_keyed_apart_from_the_stores_and_the_exact_ones():
    exact = ResultsKey("q-1", 10, 8, "fp32", 3)
    store = replace(exact, store="g-1")
    two_stage = replace(store, rescore=50)
    assert "rescore" not in store.to_json() and two_stage.to_json()["rescore"] == 50
    assert len({exact.id, store.id, two_stage.id}) == 3


def test_the_store_id_depends_on_factors_dim_and_dtype():
    key = StoreKey("f-1", 32, "bfloat16")
    others = [StoreKey("f-2", 32, "bfloat16"), StoreKey("f-1", 16, "bfloat16"), StoreKey("f-1", 32, "float16")]
    assert len({key.id, *(k.id for k in others)}) == 4
    assert key.mismatch(key.to_json()) is None
    assert key.mismatch(others[1].to_json()) == "store.dim 16 (this run: 32)"
    assert "factors 'f-2' (this run: 'f-1')" in key.mismatch(others[0].to_json())


def _basis() -> StoreBasis:
    return StoreBasis(["l"], {"l": torch.eye(4)[:, :2]}, {"l": torch.eye(3)[:, :2]})


def test_a_basis_written_under_another_key_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    written = StoreKey("f-1", 16, "bfloat16")
    url = layout.store_basis(storage.root, written.id)
    storage.write_safetensors(url, _basis().to_tensors(), {"store": json.dumps(written.to_json()),
                                                            "layers": json.dumps(["l"])})
    commit_file(storage, url)
    assert read_basis(storage, url, written.to_json()).width == 4
    with pytest.raises(StoreMismatchError) as e:
        read_basis(storage, url, StoreKey("f-1", 32, "bfloat16").to_json())
    assert "store.dim 16 (this run: 32)" in str(e.value) and "\n" not in str(e.value)


def test_a_store_file_without_its_marker_or_with_other_bytes_is_not_committed(tmp_path):
    storage = Storage(str(tmp_path))
    url = layout.store_shard(storage.root, "g-1", "s-1")
    storage.write_safetensors(url, {"rows": torch.zeros(2, 4)})
    assert read_file_commit(storage, url) is None  # data without marker
    commit_file(storage, url, shard_id="s-1", num_windows=2)
    assert read_file_commit(storage, url) is not None
    storage.write_safetensors(url, {"rows": torch.ones(2, 4)})  # same size, other bytes
    assert read_file_commit(storage, url) is None
