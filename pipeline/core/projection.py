"""Deterministic Kronecker projections ``P_in`` (k_in x d_in) and ``P_out`` (k_out x d_out).

Each matrix is drawn from a seed derived from ``(seed, module name, side)`` by
SHA-256, on the CPU in float64 and then cast, so every worker on every node
and every device gets bit-identical matrices without shipping them. Entries
are Gaussian with variance ``1/k``, so ``E[P^T P] = I`` (the sketched inner
product is unbiased). A side whose dimension is already ``<= k`` is not
projected (identity): that is exact and cheaper.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipeline.core.tracking import LayerSpec

MODES = ("sketch", "curvature")


@dataclass(frozen=True)
class ProjectionSpec:
    """``dim``: k for both sides of every layer (0 = no projection, plain EK-FAC).

    ``mode``: ``sketch`` precondition at full size then project the query
    gradient; ``curvature`` fit EK-FAC on projected vectors (LoGra).
    """

    dim: int = 0
    seed: int = 0
    mode: str = "sketch"

    def __post_init__(self):
        if self.dim < 0:
            raise ValueError(f"projection.dim must be >= 0 (0 turns projection off), got {self.dim}")
        if self.mode not in MODES:
            raise ValueError(f"projection.mode must be one of {MODES}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.dim > 0

    def to_json(self) -> dict:
        return {"dim": self.dim, "seed": self.seed, "mode": self.mode}


def _seed_for(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_matrix(seed: int, name: str, side: str, k: int, d: int) -> torch.Tensor:
    """``(k, d)`` float64 Gaussian matrix with variance ``1/k``, identical everywhere."""
    gen = torch.Generator(device="cpu").manual_seed(_seed_for(seed, name, side))
    return torch.randn(k, d, generator=gen, dtype=torch.float64) / (k**0.5)


class Projector:
    """The projection matrices of every tracked layer, on one device and dtype.

    ``p_in[name]`` / ``p_out[name]`` are ``(k, d)`` or ``None`` for identity.
    """

    def __init__(
        self,
        spec: ProjectionSpec,
        layers: dict[str, LayerSpec],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.spec = spec
        self.p_in: dict[str, torch.Tensor | None] = {}
        self.p_out: dict[str, torch.Tensor | None] = {}
        for name, layer in layers.items():
            self.p_in[name] = self._make(name, "in", layer.d_in, device, dtype)
            self.p_out[name] = self._make(name, "out", layer.d_out, device, dtype)

    def _make(self, name, side, d, device, dtype):
        if not self.spec.enabled or self.spec.dim >= d:
            return None
        return projection_matrix(self.spec.seed, name, side, self.spec.dim, d).to(device=device, dtype=dtype)

    def dims(self, layer: LayerSpec) -> tuple[int, int]:
        """``(k_out, k_in)`` of a layer's projected gradient."""
        p_out, p_in = self.p_out[layer.name], self.p_in[layer.name]
        return (layer.d_out if p_out is None else p_out.shape[0], layer.d_in if p_in is None else p_in.shape[0])

    def transforms(self) -> tuple[dict, dict]:
        """Per-layer vector transforms for ``LayerCapture``: ``x -> x @ P.T``."""

        def make(p):
            return None if p is None else (lambda x, p=p: x @ p.T.to(x.dtype))

        return (
            {n: make(p) for n, p in self.p_in.items()},
            {n: make(p) for n, p in self.p_out.items()},
        )

    def project_matrix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``P_out X P_in^T`` for ``x``: ``(..., d_out, d_in)`` -> ``(..., k_out, k_in)``."""
        p_out, p_in = self.p_out[name], self.p_in[name]
        if p_out is not None:
            x = p_out.to(x.dtype) @ x
        if p_in is not None:
            x = x @ p_in.T.to(x.dtype)
        return x
