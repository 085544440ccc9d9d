"""The gradient store's numbers: kept eigendirections, a window's stored block, a query's block (no I/O, no Ray).

Per tracked layer the store keeps ``k_out = min(dim, d_out)`` directions of
``Q_S`` and ``k_in = min(dim, d_in)`` of ``Q_A``: those whose rows (columns)
of the corrected eigenvalues ``Lambda`` carry the most mass. ``Lambda[i, j]``
is the mean square of the training gradients' ``(i, j)`` coordinate in the
eigenbasis, so these are the directions where the training gradients live.
With ``Q_S,k`` ``(d_out, k_out)`` and ``Q_A,k`` ``(d_in, k_in)``:

- a window's stored block is ``B[n] = Q_S,k^T G[n] Q_A,k``, formed from the
  captured per-token vectors as ``sum_t (Q_S,k^T g_t)(Q_A,k^T a_t)^T``;
- a query's block is ``M_q = Q_S,k^T (H^-1 G_q) Q_A,k``, taken from the
  stored preconditioned query gradient (dense, or ``left right^T`` at low rank);
- the store's score is ``sum over layers <M_q, B[n]>``, which is the exact
  score with both gradients projected onto the kept eigen-subspaces
  (``<Q_S,k M_q Q_A,k^T, G[n]>``): truncated EK-FAC. With every direction
  kept (``dim >= d_out, d_in``, e.g. curvature mode with ``store.dim >=
  projection.dim``) it is the full pass's score exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.queries import QueryGradients
from pipeline.core.tracking import Captured

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Rows of the store multiplied against the queries at once (one matrix product per block).
SCORE_BLOCK = 4096


def kept_directions(lambdas: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept ``Q_S`` columns ``(k_out,)`` and ``Q_A`` columns ``(k_in,)``, strongest first.

    ``lambdas``: ``(d_out, d_in)``. Ranked by the row (column) sums of
    ``Lambda``, ties by index, so the choice is a deterministic function of the factors.
    """
    lam = lambdas.to(torch.float64)
    rows = torch.argsort(-lam.sum(1), stable=True)[: min(dim, lam.shape[0])]
    cols = torch.argsort(-lam.sum(0), stable=True)[: min(dim, lam.shape[1])]
    return rows, cols


@dataclass
class StoreBasis:
    """The kept eigendirections of every layer: ``q_s[name]`` ``(d_out, k_out)``, ``q_a[name]`` ``(d_in, k_in)``."""

    layers: list[str]
    q_s: dict[str, torch.Tensor]
    q_a: dict[str, torch.Tensor]

    @classmethod
    def from_factors(cls, factors, dim: int) -> "StoreBasis":
        """From `pipeline.core.ekfac.EKFACFactors` (layers in the factors' order)."""
        if dim < 1:
            raise ValueError(f"store.dim must be >= 1, got {dim}")
        layers = list(factors.meta.layers)
        q_s, q_a = {}, {}
        for name in layers:
            rows, cols = kept_directions(factors.lambdas[name], dim)
            q_s[name] = factors.q_s[name][:, rows].contiguous()
            q_a[name] = factors.q_a[name][:, cols].contiguous()
        return cls(layers, q_s, q_a)

    def shapes(self) -> list[tuple[int, int]]:
        """``(k_out, k_in)`` per layer, in ``layers`` order."""
        return [(self.q_s[n].shape[1], self.q_a[n].shape[1]) for n in self.layers]

    @property
    def width(self) -> int:
        """Stored numbers per window: ``sum over layers k_out k_in``."""
        return sum(o * i for o, i in self.shapes())

    def offsets(self) -> list[tuple[int, int]]:
        """``[start, end)`` of each layer's block in a stored row."""
        out, start = [], 0
        for o, i in self.shapes():
            out.append((start, start + o * i))
            start += o * i
        return out

    def window_blocks(self, captured: dict[str, Captured]) -> torch.Tensor:
        """``(batch, width)`` stored rows: per layer ``Q_S,k^T G Q_A,k`` flattened, in the capture's dtype."""
        parts = []
        for name in self.layers:
            c = captured[name]
            q_s = self.q_s[name].to(device=c.g.device, dtype=c.g.dtype)
            q_a = self.q_a[name].to(device=c.a.device, dtype=c.a.dtype)
            parts.append(torch.bmm((c.g @ q_s).transpose(1, 2), c.a @ q_a).flatten(1))
        return torch.cat(parts, 1)

    def query_blocks(self, queries: QueryGradients) -> torch.Tensor:
        """``(Q, width)`` float64: per layer ``Q_S,k^T (H^-1 G_q) Q_A,k`` flattened."""
        parts = []
        for name in self.layers:
            q_s, q_a = self.q_s[name].to(torch.float64), self.q_a[name].to(torch.float64)
            if name in queries.dense:
                block = q_s.T @ queries.dense[name].to(torch.float64) @ q_a
            else:
                left = q_s.T @ queries.left[name].to(torch.float64)  # (Q, k_out, r)
                right = q_a.T @ queries.right[name].to(torch.float64)  # (Q, k_in, r)
                block = left @ right.mT
            parts.append(block.flatten(1))
        return torch.cat(parts, 1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}::Q_S": self.q_s[n].contiguous() for n in self.layers}
        out.update({f"{n}::Q_A": self.q_a[n].contiguous() for n in self.layers})
        return out

    @classmethod
    def from_tensors(cls, layers: list[str], tensors: dict[str, torch.Tensor]) -> "StoreBasis":
        return cls(list(layers), {n: tensors[f"{n}::Q_S"] for n in layers}, {n: tensors[f"{n}::Q_A"] for n in layers})


def store_scores(rows: torch.Tensor, query_blocks: torch.Tensor) -> torch.Tensor:
    """``(windows, Q)`` float32 scores of stored rows ``(windows, width)`` against query blocks ``(Q, width)``.

    One matrix product per block of ``SCORE_BLOCK`` rows (upcast to float32 there).
    """
    m = query_blocks.to(torch.float32).T
    out = [rows[i : i + SCORE_BLOCK].to(torch.float32) @ m for i in range(0, rows.shape[0], SCORE_BLOCK)]
    return torch.cat(out, 0) if out else torch.zeros(0, query_blocks.shape[0])


def layer_scores(rows: torch.Tensor, query_blocks: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """``(windows, Q, layers)`` per-layer scores (they sum to `store_scores`), for a few windows."""
    r, m = rows.to(torch.float32), query_blocks.to(torch.float32)
    return torch.stack([r[:, a:b] @ m[:, a:b].T for a, b in offsets], -1)
