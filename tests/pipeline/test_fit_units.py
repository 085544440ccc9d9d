"""How the fit's shards are cut into units (`pipeline.corpus.fit_units`) and what the units are named."""

from __future__ import annotations

import math

import pytest

from pipeline.config import AttributeConfig, ConfigError
from pipeline.corpus import Shard, fit_units, unit_key


def shards(sizes: list[int]) -> list[Shard]:
    return [Shard(i, f"s-{i:020x}", "file.parquet", "parquet", 0, n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    "sizes, workers, per_unit",
    [([128] * 782, 16, 2048), ([128] * 20, 16, 2048), ([16] * 8, 2, 2048), ([128] * 40, 2, 512),
     ([5, 1000, 5, 5, 5], 2, 100), ([1] * 9 + [1000], 3, 100), ([7, 3, 9, 1, 12, 4, 4, 8, 2, 10], 3, 20)],
)
def test_units_cover_every_shard_once_in_order_and_as_many_as_the_rule_says(sizes, workers, per_unit):
    given = shards(sizes)
    units = fit_units(given, workers, per_unit)
    assert [s for u in units for s in u] == given and all(units)
    total = sum(sizes)
    assert len(units) == min(len(given), max(workers, math.ceil(total / per_unit)))
    if len(set(sizes)) == 1:  # equal shards: the units' documents differ by at most one shard's
        docs = [sum(s.num_docs for s in u) for u in units]
        assert max(docs) - min(docs) <= sizes[0] and max(docs) <= total / len(units) + sizes[0]


def test_units_at_the_default_cap_are_few_and_balanced():
    """782 shards of 128 documents (the default factors.max_documents) on 16 workers: 49 units of 16 shards."""
    units = fit_units(shards([128] * 782), 16, AttributeConfig().factors.docs_per_unit)
    lengths = [len(u) for u in units]
    assert len(units) == 49 and sum(lengths) == 782 and max(lengths) - min(lengths) <= 1


def test_zero_or_one_shard_per_unit_and_bad_values():
    given = shards([10, 20, 30])
    assert fit_units(given, 2, 0) == [[s] for s in given]
    assert fit_units(given, 8, 2048) == [[s] for s in given]  # no more units than shards
    assert fit_units(given[:1], 2, 2048) == [given[:1]] and fit_units([], 2, 2048) == []
    assert fit_units(given, 1, 2048) == [given]
    with pytest.raises(ConfigError, match="factors.docs_per_unit"):
        fit_units(given, 2, -1)
    with pytest.raises(ConfigError, match="factors.docs_per_unit"):
        cfg = AttributeConfig()
        cfg.factors.docs_per_unit = -5
        cfg.validate()


def test_unit_names_are_the_shard_id_alone_or_a_digest_of_the_ids_in_order():
    a, b, c = shards([1, 1, 1])
    assert unit_key([a]) == a.shard_id  # as partial files were named before units held several shards
    key = unit_key([a, b])
    assert key.startswith("u-") and len(key) == 22 and key == unit_key([a, b])
    assert len({key, unit_key([b, a]), unit_key([a, c]), unit_key([a, b, c])}) == 4


def test_a_unit_pools_whole_shards_and_batches_each_pool_longest_first(monkeypatch):
    """`ShardWorker._fit_batches`: whole shards pooled until ``FIT_SORT_WINDOWS`` windows (the last pool
    takes what is left), each pool batched longest first; every window once; skipped documents per pool."""
    from types import SimpleNamespace

    from pipeline import worker
    from pipeline.core.text import TokenWindow, batches_of

    monkeypatch.setattr(worker, "FIT_SORT_WINDOWS", 4)
    given = shards([3, 2, 4, 1])
    lengths = {s.shard_id: [(5 * s.index + 3 * i) % 7 + 2 for i in range(s.num_docs)] for s in given}
    windows = {s.shard_id: [TokenWindow(f"{s.index}-{i}", 0, (1,) * n, (1,) * n)
                            for i, n in enumerate(lengths[s.shard_id])] for s in given}
    fake = SimpleNamespace(
        _windows=lambda s: (windows[s.shard_id], [f"skipped-{s.index}"] * s.index),
        _batches=lambda seqs, size: batches_of(seqs, size, 0),
        spec=SimpleNamespace(fit_batch_size=2),
    )
    pools = list(worker.ShardWorker._fit_batches(fake, given))
    assert [skipped for _, skipped in pools] == [0 + 1, 2, 3]  # shards 0-1 (5 windows), 2 (4), 3 (the rest)
    for (batches, _), members in zip(pools, ([0, 1], [2], [3])):
        real = [int(n) for b in batches for n in b.attention_mask.sum(1)]
        assert real == sorted((n for i in members for n in lengths[given[i].shard_id]), reverse=True)
        keys = sorted(k for b in batches for k in b.keys.tolist())
        assert len(keys) == len(set(keys)) == sum(given[i].num_docs for i in members)
