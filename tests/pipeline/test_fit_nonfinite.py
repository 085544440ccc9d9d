"""The fit's non-finite path (``ShardWorker.covariance`` / ``lambdas``), run in this process without Ray.

A window whose gradients or inputs are NaN or infinite would make every
layer's sums, hence the factors, NaN. A fit pass leaves such a window out
(`pipeline.core.influence._finite_sequences`), and the unit's commit counts it
and names it as ``doc_id#window``; the sums are those of the other windows.
The NaN is made where a real one would start, in the token embeddings of the
windows holding a rare token; everything after it is the production code path.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.core.text import batches_of
from tests.pipeline.test_worker_nonfinite import in_process_worker, rare_token


@pytest.mark.integration  # builds the small demo (conftest's small_demo), shared with the other integration tests
def test_windows_with_non_finite_gradients_are_left_out_of_both_fit_passes(small_demo, tmp_path):
    from pipeline import layout
    from pipeline.commit import commit_file
    from pipeline.core.ekfac import CovarianceSums, LambdaSums, eigendecompose, layer_groups, partial_sums_dtype

    ctx, worker = in_process_worker(small_demo, tmp_path)
    assert not ctx.cfg.factors.empirical_fisher  # the default true Fisher: labels drawn from NaN logits too
    engine, shard, root = worker.engine, ctx.shards[0], ctx.cfg.storage.root
    windows, _ = worker._windows(shard)
    token, bad = rare_token(windows)
    good = [w for w in windows if token not in w.input_ids]

    def poison(module, args, out):
        rows = (args[0] == token).any(1)
        return torch.where(rows[:, None, None], torch.full_like(out, float("nan")), out)

    groups = layer_groups({n: (spec.d_out, spec.d_in) for n, spec in engine.layers.items()}, 3)
    hook = engine.model.get_input_embeddings().register_forward_hook(poison)
    try:
        cov_url = layout.url(root, "cov")
        commit = worker.covariance(shard, cov_url, groups)
    finally:
        hook.remove()
    assert commit.num_nonfinite_windows == len(bad)
    assert sorted(commit.nonfinite_windows) == bad
    tensors = {}
    for i in range(len(groups)):  # one file per layer group, each with the unit's token count
        tensors.update(worker.storage.read_safetensors(
            layout.url(cov_url, layout.group_file(i, len(groups))), cast=partial_sums_dtype)[0])
    sums = CovarianceSums.from_tensors(tensors)
    clean = engine.covariance_sums(batches_of(good, worker.spec.fit_batch_size, worker.pad_id))
    assert sums.num_tokens == clean.num_tokens
    for name in engine.layers:
        for mine, want in ((sums.a_sum[name], clean.a_sum[name]), (sums.s_sum[name], clean.s_sum[name])):
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine, want.double(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))

    bases = eigendecompose(clean, torch.float64)
    bases_url = layout.url(root, "bases.safetensors")
    worker.storage.write_safetensors(bases_url, bases.to_tensors())
    commit_file(worker.storage, bases_url)
    hook = engine.model.get_input_embeddings().register_forward_hook(poison)
    try:
        lam_url = layout.url(root, "lambda.safetensors")
        commit = worker.lambdas(shard, [bases_url], lam_url)
    finally:
        hook.remove()
    assert commit.num_nonfinite_windows == len(bad) and sorted(commit.nonfinite_windows) == bad
    lam = LambdaSums.from_tensors(worker.storage.read_safetensors(lam_url, cast=partial_sums_dtype)[0])
    want = engine.lambda_sums(batches_of(good, worker.spec.fit_batch_size, worker.pad_id), bases)
    assert lam.num_sequences == want.num_sequences == len(good)
    for name in engine.layers:
        assert torch.isfinite(lam.sums[name]).all()
        torch.testing.assert_close(lam.sums[name], want.sums[name].double(), rtol=1e-3,
                                   atol=1e-4 * float(want.sums[name].abs().max()))
