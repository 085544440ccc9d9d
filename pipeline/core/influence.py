"""EK-FAC influence for a causal LM: fit, precondition queries, score sequences.

``InfluenceEngine`` wraps one model. It has no I/O and no Ray: the pipeline
drives it shard by shard, and tests drive it in one process.

Score convention (DESIGN section 2): ``score(q, n) = sum over layers
<H^-1 grad f(q), grad log p(n)>`` with ``f(q) = log p(completion | prompt)``.
Both gradients are of log-probabilities, i.e. minus the loss gradients, so the
signs cancel and we use loss gradients on both sides. Positive = proponent.

Spaces: with projection off everything is full size. ``sketch`` mode fits
factors and preconditions queries at full size, then projects the query;
``curvature`` mode (LoGra) fits and preconditions in the projected space.
Training gradients are always captured projected when projection is on and
never formed at full size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from pipeline.core.ekfac import (
    CovarianceSums,
    EKFACFactors,
    Eigenbases,
    FactorsMeta,
    LambdaSums,
    eigendecompose,
    per_sequence_gradients,
)
from pipeline.core.fingerprint import model_fingerprint
from pipeline.core.forward import sequence_losses
from pipeline.core.projection import ProjectionSpec, Projector
from pipeline.core.text import Batch
from pipeline.core.tracking import (
    DEFAULT_MODULES,
    Captured,
    LayerCapture,
    find_tracked_layers,
    prepare_model,
)

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float64", "bf16")


class NonFiniteGradientError(ValueError):
    """A sequence whose gradient (hence score) is NaN or infinite."""


@dataclass(frozen=True)
class InfluenceConfig:
    """Numerical choices of the attribution.

    modules: regular expression (full match) over module names selecting the
        tracked ``nn.Linear``/``Conv1D`` layers; default: MLP layers of every block.
    projection: projection dimension, seed and mode (``dim=0``: plain EK-FAC).
    damping: fixed damping, or ``None`` for ``0.1 * mean(Lambda)`` per layer.
    empirical_fisher: fit with the data's labels instead of labels sampled
        from the model (true Fisher).
    precision: ``float32`` (default), ``float64`` (references/tests), or
        ``bf16`` (autocast on CUDA; captured vectors stay float32).
    query_rank: 0 keeps preconditioned query gradients dense; ``r > 0``
        compresses each to rank ``r`` per layer (truncated SVD).
    seed: seed for sampled Fisher labels.
    """

    modules: str = DEFAULT_MODULES
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    damping: float | None = None
    empirical_fisher: bool = False
    precision: str = "float32"
    query_rank: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"factors.damping must be >= 0 or null, got {self.damping}")
        if self.query_rank < 0:
            raise ValueError(f"query_rank must be >= 0, got {self.query_rank}")

    @property
    def factor_space(self) -> str:
        """Where EK-FAC is fitted: ``projected`` only in curvature mode."""
        return "projected" if self.projection.enabled and self.projection.mode == "curvature" else "full"


@dataclass
class QueryGradients:
    """Preconditioned (and projected) query gradients, stacked over queries.

    Dense: ``dense[name]``: ``(Q, k_out, k_in)``. Low rank: ``left[name]``:
    ``(Q, k_out, r)`` (singular values folded in) and ``right[name]``:
    ``(Q, k_in, r)``, so the query matrix is ``left @ right^T``.
    """

    query_ids: list[str]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return list(self.dense or self.left)

    def to(self, device, dtype) -> "QueryGradients":
        move = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return QueryGradients(self.query_ids, move(self.dense), move(self.left), move(self.right))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}::dense": t for n, t in self.dense.items()}
        out.update({f"{n}::left": t for n, t in self.left.items()})
        out.update({f"{n}::right": t for n, t in self.right.items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, query_ids: list[str], tensors: dict[str, torch.Tensor]) -> "QueryGradients":
        def pick(suffix):
            return {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}

        return cls(list(query_ids), pick("::dense"), pick("::left"), pick("::right"))

    def layer_scores(self, name: str, captured: Captured) -> torch.Tensor:
        """``(batch, Q)`` scores of one layer from captured training vectors."""
        if name in self.dense:
            grads = per_sequence_gradients(captured)  # (B, k_out, k_in)
            return grads.flatten(1) @ self.dense[name].flatten(1).T
        # <L R^T, sum_t g_t a_t^T> = sum_t sum_r (g_t . L[:, r]) (a_t . R[:, r])
        gl = torch.einsum("bto,qor->bqtr", captured.g, self.left[name])
        ar = torch.einsum("bti,qir->bqtr", captured.a, self.right[name])
        return (gl * ar).sum(dim=(2, 3))

    def token_scores(self, name: str, captured: Captured) -> torch.Tensor:
        """``(batch, Q, tokens)`` per-token scores of one layer."""
        matrix = self.dense[name] if name in self.dense else self.left[name] @ self.right[name].transpose(1, 2)
        return torch.einsum("bto,qoi,bti->bqt", captured.g, matrix, captured.a)


def _low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``(Q, m, n)`` matrices: ``(Q, m, r)`` (with S) and ``(Q, n, r)``."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[-1])
    left = u[..., :r] * s[..., None, :r]
    right = vh[..., :r, :].transpose(-1, -2)
    return left.to(matrix.dtype), right.to(matrix.dtype)


class InfluenceEngine:
    """One model prepared for EK-FAC influence: fit, precondition, score.

    ``model`` is put in eval mode with only the tracked weights requiring grad.
    """

    def __init__(self, model: torch.nn.Module, config: InfluenceConfig, device: str | torch.device | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        if config.precision == "float64":
            self.model = self.model.to(torch.float64)
        self.dtype = torch.float64 if config.precision == "float64" else torch.float32
        self.layers = find_tracked_layers(self.model, config.modules)
        prepare_model(self.model, self.layers)
        self.projector = (
            Projector(config.projection, self.layers, self.device, self.dtype) if config.projection.enabled else None
        )
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def space_dims(self, projected: bool) -> dict[str, tuple[int, int]]:
        """``(d_out, d_in)`` of every layer in the full or projected space."""
        if projected and self.projector is not None:
            return {n: self.projector.dims(s) for n, s in self.layers.items()}
        return {n: (s.d_out, s.d_in) for n, s in self.layers.items()}

    def _capture(self, projected: bool) -> LayerCapture:
        if projected and self.projector is not None:
            t_in, t_out = self.projector.transforms()
            return LayerCapture(self.model, self.layers, t_in, t_out, self.dtype)
        return LayerCapture(self.model, self.layers, dtype=self.dtype)

    def capture_batch(
        self, batch: Batch, projected: bool, label_mode: str = "data", generator: torch.Generator | None = None
    ) -> tuple[dict[str, Captured], torch.Tensor]:
        """One forward and backward: per-layer captured vectors and per-sequence losses."""
        batch = batch.to(self.device)
        capture = self._capture(projected)
        with capture.recording(batch.attention_mask):
            losses = sequence_losses(self.model, batch, label_mode, generator, self.config.precision)
        captured = capture.backward(losses.sum())
        return captured, losses.detach()

    # ---- fitting -------------------------------------------------------------------------

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @property
    def _label_mode(self) -> str:
        return "data" if self.config.empirical_fisher else "sampled"

    def covariance_sums(self, batches: Iterable[Batch], seed: int | None = None) -> CovarianceSums:
        """First pass: ``A`` and ``S`` sums over the batches (one shard's partial result)."""
        projected = self.config.factor_space == "projected"
        sums = CovarianceSums.zeros(self.space_dims(projected), self.device)
        gen = self._generator(self.config.seed if seed is None else seed)
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected, self._label_mode, gen)
            sums.update(captured, batch.attention_mask.to(self.device))
        return sums

    def lambda_sums(self, batches: Iterable[Batch], bases: Eigenbases, seed: int | None = None) -> LambdaSums:
        """Second pass: eigenvalue-correction sums in the fitted eigenbases."""
        projected = self.config.factor_space == "projected"
        sums = LambdaSums.zeros(self.space_dims(projected), self.device)
        gen = self._generator((self.config.seed if seed is None else seed) + 1)
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected, self._label_mode, gen)
            sums.update(captured, bases, batch.input_ids.shape[0])
        return sums

    def factors_meta(self) -> FactorsMeta:
        space = self.config.factor_space
        return FactorsMeta(
            model_fingerprint=self.fingerprint,
            modules_pattern=self.config.modules,
            layers=dict(self.layers),
            fisher="empirical" if self.config.empirical_fisher else "sampled",
            space=space,
            projection=self.config.projection.to_json() if space == "projected" else {},
        )

    def fit(self, batches: list[Batch]) -> EKFACFactors:
        """Both passes in this process (the pipeline distributes them instead)."""
        bases = eigendecompose(self.covariance_sums(batches))
        return EKFACFactors.from_parts(self.factors_meta(), bases, self.lambda_sums(batches, bases))

    def check_factors(self, factors: EKFACFactors) -> None:
        space = self.config.factor_space
        projection = self.config.projection.to_json() if space == "projected" else {}
        factors.check_compatible(self.fingerprint, self.layers, space, projection)

    # ---- queries -------------------------------------------------------------------------

    def query_gradients(self, batches: Iterable[Batch], factors: EKFACFactors, query_ids: list[str]) -> QueryGradients:
        """Preconditioned query gradients ``H^-1 G_q`` (projected when projection is on), stacked."""
        self.check_factors(factors)
        projected_fit = self.config.factor_space == "projected"
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected_fit, "data")
            for name, c in captured.items():
                pre = factors.precondition(name, per_sequence_gradients(c), self.config.damping)
                if self.projector is not None and not projected_fit:
                    pre = self.projector.project_matrix(name, pre)  # sketch mode
                parts[name].append(pre)
        dense = {n: torch.cat(p, 0) for n, p in parts.items()}
        count = next(iter(dense.values())).shape[0]
        if count != len(query_ids):
            raise ValueError(f"{count} query gradients for {len(query_ids)} query ids")
        bad = [query_ids[i] for i in range(count) if not all(torch.isfinite(d[i]).all() for d in dense.values())]
        if bad:
            raise NonFiniteGradientError(f"non-finite gradient for queries {bad[:10]}")
        if self.config.query_rank > 0:
            lr = {n: _low_rank(d, self.config.query_rank) for n, d in dense.items()}
            return QueryGradients(query_ids, left={n: v[0] for n, v in lr.items()}, right={n: v[1] for n, v in lr.items()})
        return QueryGradients(query_ids, dense=dense)

    # ---- scoring -------------------------------------------------------------------------

    def score_batch(self, batch: Batch, queries: QueryGradients, per_layer: bool = False):
        """Scores ``(batch, Q)`` of training sequences against every query.

        With ``per_layer``, also returns ``(batch, Q, layers)`` in ``self.layers`` order.
        Non-finite scores are returned as they are; ``check_finite`` names them.
        """
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        layer_scores = [queries.layer_scores(name, captured[name]) for name in self.layers]
        total = torch.stack(layer_scores, -1).sum(-1)
        return (total, torch.stack(layer_scores, -1)) if per_layer else total

    def token_scores(self, batch: Batch, queries: QueryGradients) -> torch.Tensor:
        """Per-token, per-layer scores ``(batch, Q, layers, tokens)``; they sum to ``score_batch``."""
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        return torch.stack([queries.token_scores(name, captured[name]) for name in self.layers], 2)


def check_finite(scores: torch.Tensor, names: list[str]) -> None:
    """Raise ``NonFiniteGradientError`` naming the sequences whose scores are not finite."""
    bad = (~torch.isfinite(scores)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN/inf) for training sequences {[names[i] for i in bad][:10]}; "
            "they were not scored. Check the model's precision or these documents."
        )
