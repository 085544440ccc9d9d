"""Layer groups of the fit's eigendecompositions (`pipeline.core.ekfac.layer_groups`) and their bases."""

import pytest
import torch

from pipeline.core.ekfac import EIGH_GROUPS, CovarianceSums, Eigenbases, eigendecompose, layer_groups


def cost(dims, group):
    return sum(dims[n][0] ** 3 + dims[n][1] ** 3 for n in group)


def test_groups_cover_every_layer_once_in_order_and_balance_the_cost():
    # SmolLM2-like blocks (gate/up 576 -> 1536, down 1536 -> 576) and a few odd shapes
    dims = {}
    for b in range(30):
        dims.update({f"l.{b}.gate": (1536, 576), f"l.{b}.up": (1536, 576), f"l.{b}.down": (576, 1536)})
    dims.update({"head.a": (4096, 64), "head.b": (32, 32)})
    groups = layer_groups(dims)
    assert len(groups) == EIGH_GROUPS
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(dims) and len(flat) == len(dims)
    order = list(dims)
    for g in groups:
        assert g == sorted(g, key=order.index)
    assert [g[0] for g in groups] == sorted((g[0] for g in groups), key=order.index)
    loads = [cost(dims, g) for g in groups]
    # greedy largest-first: no group exceeds the lightest by more than the costliest layer
    assert max(loads) - min(loads) <= max(cost(dims, [n]) for n in dims)
    assert layer_groups(dims) == groups  # deterministic


def test_fewer_layers_than_groups_and_bad_count():
    dims = {"a": (8, 4), "b": (4, 8), "c": (2, 2)}
    assert sorted(layer_groups(dims), key=len) == [["a"], ["b"], ["c"]]
    assert layer_groups(dims, 1) == [["a", "b", "c"]]
    groups = layer_groups(dims, 2)
    assert sorted(n for g in groups for n in g) == ["a", "b", "c"] and len(groups) == 2
    with pytest.raises(ValueError, match="count"):
        layer_groups(dims, 0)


def random_sums(dims, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sums = CovarianceSums.zeros(dims, dtype=torch.float64)
    for n, (d_out, d_in) in dims.items():
        a, g = torch.randn(50, d_in, generator=gen, dtype=torch.float64), torch.randn(50, d_out, generator=gen,
                                                                                     dtype=torch.float64)
        sums.a_sum[n] += a.T @ a
        sums.s_sum[n] += g.T @ g
    sums.num_tokens = 50
    return sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bases_decomposed_group_by_group_through_files_equal_one_decomposition(dtype):
    """What the fit does since the eigendecompositions moved to the workers: each group's sums written as a
    unit writes them (`CovarianceSums.to_tensors(names=...)`), decomposed alone, its bases stored and read
    back (`Eigenbases.to_tensors`/`from_tensors`) and joined (`update`): the very bases of one decomposition."""
    dims = {"x": (12, 7), "y": (5, 9), "z": (3, 3), "w": (10, 10)}
    sums = random_sums(dims)
    whole = eigendecompose(sums, dtype)
    joined = None
    for names in layer_groups(dims, 3):
        part = CovarianceSums.from_tensors(sums.to_tensors(torch.float64, names))
        assert set(part.a_sum) == set(names) and part.num_tokens == sums.num_tokens
        bases = Eigenbases.from_tensors(eigendecompose(part, dtype).to_tensors())
        if joined is None:
            joined = bases
        else:
            joined.update(bases)
    assert joined.num_tokens == whole.num_tokens
    for n in dims:
        assert joined.q_a[n].dtype == dtype
        assert torch.equal(joined.q_a[n], whole.q_a[n]) and torch.equal(joined.q_s[n], whole.q_s[n])


def test_bases_of_another_fit_are_not_joined():
    dims = {"x": (4, 3)}
    one = eigendecompose(random_sums(dims), torch.float64)
    other = eigendecompose(CovarianceSums(random_sums(dims).a_sum, random_sums(dims).s_sum, 51), torch.float64)
    with pytest.raises(ValueError, match="not one fit"):
        one.update(other)
