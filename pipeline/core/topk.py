"""Exact streaming top-k / bottom-k per query.

Order is total and deterministic: by score (descending for proponents,
ascending for opponents), then by the caller's int64 ``key`` ascending. Since
the merge of shard results uses the same order, the global top-k is exactly
the top-k of the union of the shards' top-k, ties included.
"""

from __future__ import annotations

import torch


def _select(scores: torch.Tensor, keys: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the first ``k`` of ``scores`` ``(Q, n)`` ordered by (score, key)."""
    order = torch.argsort(keys, dim=1, stable=True)
    scores, keys = scores.gather(1, order), keys.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=largest, stable=True)[:, :k]
    return scores.gather(1, order), keys.gather(1, order)


class TopK:
    """Running ``k`` largest and ``k`` smallest scores per query.

    ``update(scores, keys)`` with ``scores``: ``(batch, Q)`` and ``keys``:
    ``(batch,)`` int64. Memory is ``O(Q k)`` whatever the number of updates.
    """

    def __init__(self, num_queries: int, k: int):
        if k <= 0:
            raise ValueError(f"top_k must be > 0, got {k}")
        self.k = k
        empty_s = torch.empty(num_queries, 0, dtype=torch.float64)
        empty_k = torch.empty(num_queries, 0, dtype=torch.int64)
        self.top = (empty_s, empty_k)
        self.bottom = (empty_s, empty_k)

    def update(self, scores: torch.Tensor, keys: torch.Tensor) -> None:
        if not torch.isfinite(scores).all():
            raise ValueError("non-finite scores reached the top-k accumulator")
        s = scores.detach().to("cpu", torch.float64).T
        kk = keys.detach().to("cpu", torch.int64).unsqueeze(0).expand_as(s)
        for attr, largest in (("top", True), ("bottom", False)):
            old_s, old_k = getattr(self, attr)
            setattr(self, attr, _select(torch.cat([old_s, s], 1), torch.cat([old_k, kk], 1), self.k, largest))

    def proponents(self, q: int) -> list[tuple[float, int]]:
        """``(score, key)`` with score > 0, strongest first."""
        s, k = self.top
        return [(float(a), int(b)) for a, b in zip(s[q], k[q]) if a > 0]

    def opponents(self, q: int) -> list[tuple[float, int]]:
        """``(score, key)`` with score < 0, most negative first."""
        s, k = self.bottom
        return [(float(a), int(b)) for a, b in zip(s[q], k[q]) if a < 0]
