"""The worker's non-finite path (``ShardWorker.score``), run in this process without Ray.

A window whose score against any query is NaN or infinite is left out of the
shard's ranking (never scored as zero), and the shard's commit counts it and
names it as ``doc_id#window``. The scores are made non-finite where they come
from, ``InfluenceEngine.score_batch`` (dense queries) and ``score_breakdown``
(low-rank queries, the default); everything after it is the production code path.
"""

from __future__ import annotations

import collections
import io

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import AttributeConfig, CorpusConfig, ModelConfig, QueriesConfig, StorageConfig
from pipeline.core.text import batches_of


def in_process_worker(small_demo, tmp_path):
    """``(ctx, worker)``: the small demo prepared as a run would (no preflight), and a `ShardWorker` in this process."""
    from pipeline.context import prepare, worker_spec
    from pipeline.worker import ShardWorker

    cfg = AttributeConfig(
        model=ModelConfig(path=small_demo.model_dir),
        corpus=CorpusConfig(path=small_demo.corpus_path, docs_per_shard=32, window=64),  # no preflight here
        queries=QueriesConfig(path=small_demo.queries_path),
        storage=StorageConfig(root=str(tmp_path / "out")),
    )
    ctx = prepare(cfg)
    return ctx, ShardWorker(worker_spec(ctx.cfg))


def rare_token(windows) -> tuple[int, list[str]]:
    """A token held by 2-4 of ``windows`` (the rarest such, then the smallest id) and those windows'
    ``doc_id#window``, sorted."""
    holders = collections.defaultdict(list)
    for w in windows:
        for token in set(w.input_ids):
            holders[token].append(w)
    token = min((t for t, ws in holders.items() if 2 <= len(ws) <= 4), key=lambda t: (len(holders[t]), t))
    return token, sorted(f"{w.doc_id}#{w.window}" for w in holders[token])


@pytest.mark.integration  # builds the small demo (conftest's small_demo), shared with the other integration tests
def test_windows_with_non_finite_scores_are_left_out_and_counted(small_demo, tmp_path):
    from pipeline.commit import commit_file

    ctx, worker = in_process_worker(small_demo, tmp_path)
    shard = ctx.shards[0]
    windows, _ = worker._windows(shard)
    factors = worker.engine.fit(batches_of(windows, 8, worker.pad_id))
    root = ctx.cfg.storage.root
    worker.storage.write_bytes(f"{root}/factors.bin", factors.to_bytes())
    commit_file(worker.storage, f"{root}/factors.bin")  # the fit stage's marker: readers check it
    worker.precondition(ctx.queries, f"{root}/factors.bin", f"{root}/queries.safetensors")

    # Poison the windows holding a token that occurs in a few of them only: NaN in one, +inf in the others.
    token, bad = rare_token(windows)
    def poison(batch, scores):
        for row, ids in enumerate(batch.input_ids.tolist()):
            if token in ids:
                scores[row, row % scores.shape[1]] = float("nan") if row % 2 else float("inf")
        return scores

    score_batch, score_breakdown = worker.engine.score_batch, worker.engine.score_breakdown

    def poisoned_breakdown(batch, queries):
        total, per_layer, per_token = score_breakdown(batch, queries)
        return poison(batch, total), per_layer, per_token

    worker.engine.score_batch = lambda batch, queries, **kw: poison(batch, score_batch(batch, queries, **kw))
    worker.engine.score_breakdown = poisoned_breakdown
    commit = worker.score(shard, f"{root}/queries.safetensors", f"{root}/shard-0.parquet", top_k=5)

    assert commit.num_nonfinite_windows == len(bad)
    assert sorted(commit.nonfinite_windows) == bad
    table = pq.read_table(io.BytesIO(worker.storage.read_bytes(f"{root}/shard-0.parquet")))
    assert table.num_rows > 0
    left_out = {tuple(b.rsplit("#", 1)) for b in bad}
    ranked = {(r["doc_id"], str(r["window"])) for r in table.select(["doc_id", "window"]).to_pylist()}
    assert not ranked & left_out, "a window with a non-finite score was ranked"
    assert all(torch.isfinite(torch.tensor(table.column("score").to_pylist())))
