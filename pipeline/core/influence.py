"""EK-FAC influence for a causal LM: fit, precondition queries, score sequences.

``InfluenceEngine`` wraps one model. It has no I/O and no Ray: the pipeline
drives it shard by shard, and tests drive it in one process.

Score convention (docs/design.md#maths): ``score(q, n) = sum over layers
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
    rotation_path,
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
DEFAULT_MAX_QUERY_BYTES = 8 * 2**30
# Largest temporary (elements) of one low-rank scoring step; queries are scored in chunks below it.
SCORING_CHUNK_ELEMENTS = 2**25
SCORING_PATHS = ("token", "sequence")


class NonFiniteGradientError(ValueError):
    """A sequence whose gradient (hence score) is NaN or infinite."""


class QueryMemoryError(ValueError):
    """Preconditioned query gradients that would exceed ``max_query_bytes`` if formed."""


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
    max_query_bytes: memory budget of the stored query gradients (all
        queries, all layers); ``query_gradients`` raises ``QueryMemoryError``
        before forming them when they would need more.
    seed: seed for sampled Fisher labels.
    """

    modules: str = DEFAULT_MODULES
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    damping: float | None = None
    empirical_fisher: bool = False
    precision: str = "float32"
    query_rank: int = 0
    max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"factors.damping must be >= 0 or null, got {self.damping}")
        if self.query_rank < 0:
            raise ValueError(f"query_rank must be >= 0, got {self.query_rank}")
        if self.max_query_bytes <= 0:
            raise ValueError(f"max_query_bytes must be > 0, got {self.max_query_bytes}")

    @property
    def factor_space(self) -> str:
        """Where EK-FAC is fitted: ``projected`` only in curvature mode."""
        return "projected" if self.projection.enabled and self.projection.mode == "curvature" else "full"


@dataclass
class QueryGradients:
    """Preconditioned (and projected) query gradients, stacked over queries.

    Dense: ``dense[name]``: ``(Q, k_out, k_in)``. Low rank: ``left[name]``:
    ``(Q, k_out, r)`` and ``right[name]``: ``(Q, k_in, r)`` (singular values
    folded into one of them), so the query matrix is ``left @ right^T``.
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

    def layer_scores(self, name: str, captured: Captured, path: str | None = None) -> torch.Tensor:
        """``(batch, Q)`` scores of one layer from captured training vectors.

        Low-rank queries are scored by the cheaper ``scoring_path`` for this
        shape unless ``path`` (``token``/``sequence``) forces one.
        """
        if name in self.dense:
            grads = per_sequence_gradients(captured)  # (B, k_out, k_in)
            return grads.flatten(1) @ self.dense[name].flatten(1).T
        left, right = self.left[name], self.right[name]
        g, a = captured.g, captured.a
        path = path or scoring_path(g.shape[1], g.shape[-1], a.shape[-1], left.shape[0] * left.shape[-1])
        if path not in SCORING_PATHS:
            raise ValueError(f"scoring path must be one of {SCORING_PATHS}, got {path!r}")
        batch, tokens = g.shape[:2]
        rank = left.shape[-1]
        # Chunks of queries keep the largest temporary under SCORING_CHUNK_ELEMENTS.
        rows = batch * (tokens if path == "token" else g.shape[-1])
        step = max(1, SCORING_CHUNK_ELEMENTS // max(1, rows * rank))
        grads = per_sequence_gradients(captured).flatten(0, 1) if path == "sequence" else None
        out = []
        for q0 in range(0, left.shape[0], step):
            lq, rq = left[q0 : q0 + step], right[q0 : q0 + step]  # (q, k_out, r), (q, k_in, r)
            q = lq.shape[0]
            l_flat = lq.permute(1, 0, 2).reshape(lq.shape[1], q * rank)  # (k_out, q*r)
            r_flat = rq.permute(1, 0, 2).reshape(rq.shape[1], q * rank)  # (k_in, q*r)
            if path == "token":
                # <L R^T, sum_t g_t a_t^T> = sum_t sum_r (g_t . L[:, r]) (a_t . R[:, r])
                prod = (g @ l_flat) * (a @ r_flat)  # (B, T, q*r)
                out.append(prod.reshape(batch, tokens, q, rank).sum(dim=(1, 3)))
            else:
                # <L R^T, G> = sum_{o,r} (G R)[o, r] L[o, r]
                gr = (grads @ r_flat).reshape(batch, -1, q * rank)  # (B, k_out, q*r)
                out.append((gr * l_flat).reshape(batch, -1, q, rank).sum(dim=(1, 3)))
        return torch.cat(out, 1)

    def token_scores(self, name: str, captured: Captured) -> torch.Tensor:
        """``(batch, Q, tokens)`` per-token scores of one layer."""
        matrix = self.dense[name] if name in self.dense else self.left[name] @ self.right[name].transpose(1, 2)
        return torch.einsum("bto,qoi,bti->bqt", captured.g, matrix, captured.a)


# Randomized range finder of ``low_rank``: extra columns and power iterations (Halko et al. 2011, section 4).
RANGE_OVERSAMPLE = 10
RANGE_POWER_ITERS = 2


def scoring_path(tokens: int, d_out: int, d_in: int, columns: int) -> str:
    """The cheaper way to score sequences of ``tokens`` tokens against ``columns = Q * r`` low-rank columns.

    ``token``: ``sum_t (g_t . L)(a_t . R)``, ``T columns (d_out + d_in + 1)``
    multiply-adds per sequence, never forming ``G``. ``sequence``: form ``G``
    then ``(G R) . L``, ``T d_out d_in + d_out d_in columns + d_out columns``.
    """
    per_token = tokens * columns * (d_out + d_in + 1)
    per_sequence = tokens * d_out * d_in + d_out * d_in * columns + d_out * columns
    return "token" if per_token < per_sequence else "sequence"


def low_rank(matrix: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` approximation of ``(Q, m, n)`` matrices as ``left @ right^T``: ``(Q, m, r)``, ``(Q, n, r)``.

    When ``r + RANGE_OVERSAMPLE`` is small against ``min(m, n)`` (the default
    rank 8 against a 576-wide layer), a seeded randomized range finder
    (Halko, Martinsson and Tropp 2011, Algorithm 4.4: ``RANGE_POWER_ITERS``
    power iterations, QR between them) finds an orthonormal basis ``B`` of
    ``r + RANGE_OVERSAMPLE`` columns for the range, and the best rank-``r``
    approximation of ``B^T M`` gives the factors: about ``2 (1 + iters)``
    products with the matrix instead of its Gram matrix and ``eigh``, some
    20 times less work on a 1536 x 576 layer. Otherwise the top ``r``
    eigenvectors of the smaller Gram matrix give the best approximation
    exactly (Eckart-Young; exact at full rank). float64 either way; the
    random test matrix is fixed by ``seed``, so the result is deterministic.
    """
    m64 = matrix.to(torch.float64)
    m, n = m64.shape[-2:]
    r = min(rank, m, n)
    width = r + RANGE_OVERSAMPLE
    if 2 * width > min(m, n):
        if n <= m:
            v = torch.linalg.eigh(m64.mT @ m64).eigenvectors[..., -r:].flip(-1)  # (Q, n, r), largest first
            left, right = m64 @ v, v
        else:
            u = torch.linalg.eigh(m64 @ m64.mT).eigenvectors[..., -r:].flip(-1)  # (Q, m, r)
            left, right = u, m64.mT @ u
        return left.to(matrix.dtype), right.to(matrix.dtype)
    generator = torch.Generator(device=m64.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64, device=m64.device)
    basis = torch.linalg.qr(m64 @ omega).Q  # (Q, m, width)
    for _ in range(RANGE_POWER_ITERS):
        basis = torch.linalg.qr(m64.mT @ basis).Q  # (Q, n, width)
        basis = torch.linalg.qr(m64 @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ m64, full_matrices=False)  # (Q, width, n) is small
    left = (basis @ u[..., :r]) * s[..., None, :r]
    return left.to(matrix.dtype), vh[..., :r, :].mT.to(matrix.dtype)


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

    def query_bytes(self, num_queries: int, rank: int | None = None) -> int:
        """Bytes of ``num_queries`` stored query gradients at ``rank`` (default: the config's; 0 = dense)."""
        rank = self.config.query_rank if rank is None else rank
        size = torch.empty((), dtype=self.dtype).element_size()
        per_query = sum(
            k_out * k_in if rank == 0 else min(rank, k_out, k_in) * (k_out + k_in)
            for k_out, k_in in self.space_dims(projected=True).values()
        )
        return num_queries * per_query * size

    def check_query_memory(self, num_queries: int) -> None:
        """Raise ``QueryMemoryError`` when the query gradients would exceed ``max_query_bytes``."""
        need, budget = self.query_bytes(num_queries), self.config.max_query_bytes
        if need <= budget:
            return
        rank = self.config.query_rank
        fitting = [r for r in (256, 128, 64, 32, 16, 8, 4, 2, 1) if self.query_bytes(num_queries, r) <= budget]
        advice = (
            f"set score.query_rank={fitting[0]} ({self.query_bytes(num_queries, fitting[0]) / 2**30:.2f} GiB)"
            if fitting and (rank == 0 or fitting[0] < rank)
            else "score fewer queries per run"
        )
        kind = "dense" if rank == 0 else f"rank-{rank}"
        raise QueryMemoryError(
            f"{num_queries} {kind} preconditioned query gradients need {need / 2**30:.2f} GiB, more than "
            f"max_query_bytes={budget / 2**30:.2f} GiB (score.query_rank={rank}); {advice}, or raise the budget"
        )

    def _precondition_layer(
        self, name: str, captured: Captured, factors: EKFACFactors, path: str | None
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One layer's preconditioned query gradients for one batch, and which are finite ``(batch,)``.

        Dense ``(batch, k_out, k_in)``, or ``(left, right)`` at low rank.
        """
        damping, rank = self.config.damping, self.config.query_rank
        sketch = self.projector is not None and self.config.factor_space != "projected"
        if rank == 0 or sketch:
            pre = factors.precondition_captured(name, captured, damping, path)
            if sketch:
                pre = self.projector.project_matrix(name, pre)
        else:
            # Compress in the eigenbasis: H^-1 G = Q_S M Q_A^T with M = rotated / (Lambda + lambda),
            # so M's best rank-r factors rotated by Q_S and Q_A are H^-1 G's; H^-1 G is never formed.
            pre = factors.precondition_rotated(name, captured, damping, path)
        finite = torch.isfinite(pre).flatten(1).all(1)
        if rank == 0:
            return pre, finite
        # A non-finite matrix would break the eigensolver; it is reported by the caller instead.
        left, right = low_rank(torch.where(finite[:, None, None], pre, 0), rank)
        if sketch:
            return (left, right), finite
        q_s, q_a = factors.bases(name, captured.g)
        return (q_s @ left, q_a @ right), finite

    def query_gradients(
        self, batches: Iterable[Batch], factors: EKFACFactors, query_ids: list[str], path: str | None = None
    ) -> QueryGradients:
        """Preconditioned query gradients ``H^-1 G_q`` (projected when projection is on), stacked.

        Their memory is checked (``check_query_memory``) before any is formed.
        Each batch is captured once for all layers; then layer by layer the
        batch's gradients are preconditioned and, with ``query_rank > 0``,
        compressed, so only one layer's dense results of one batch are alive
        at a time. ``path`` forces the rotation path (tests).
        """
        self.check_factors(factors)
        self.check_query_memory(len(query_ids))
        projected_fit = self.config.factor_space == "projected"
        parts: dict[str, list] = {n: [] for n in self.layers}
        finite: list[torch.Tensor] = []
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected_fit, "data")
            ok = torch.ones(batch.input_ids.shape[0], dtype=torch.bool, device=self.device)
            for name in self.layers:
                part, layer_ok = self._precondition_layer(name, captured.pop(name), factors, path)
                ok &= layer_ok
                parts[name].append(part)
            finite.append(ok)
        ok = torch.cat(finite).cpu()
        if ok.shape[0] != len(query_ids):
            raise ValueError(f"{ok.shape[0]} query gradients for {len(query_ids)} query ids")
        bad = [query_ids[i] for i in (~ok).nonzero().flatten().tolist()]
        if bad:
            raise NonFiniteGradientError(f"non-finite gradient for queries {bad[:10]}")
        if self.config.query_rank > 0:
            left = {n: torch.cat([lr[0] for lr in p], 0) for n, p in parts.items()}
            right = {n: torch.cat([lr[1] for lr in p], 0) for n, p in parts.items()}
            return QueryGradients(query_ids, left=left, right=right)
        return QueryGradients(query_ids, dense={n: torch.cat(p, 0) for n, p in parts.items()})

    # ---- scoring -------------------------------------------------------------------------

    def score_batch(self, batch: Batch, queries: QueryGradients, per_layer: bool = False):
        """Scores ``(batch, Q)`` of training sequences against every query.

        With ``per_layer``, also returns ``(batch, Q, layers)`` in ``self.layers`` order.
        Non-finite scores are returned as they are: ``ShardWorker.score`` leaves their windows out
        of the ranking and counts them in the shard's commit.
        """
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        layer_scores = [queries.layer_scores(name, captured[name]) for name in self.layers]
        total = torch.stack(layer_scores, -1).sum(-1)
        return (total, torch.stack(layer_scores, -1)) if per_layer else total

    def token_scores(self, batch: Batch, queries: QueryGradients) -> torch.Tensor:
        """Per-token, per-layer scores ``(batch, Q, layers, tokens)``; they sum to ``score_batch``."""
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        return torch.stack([queries.token_scores(name, captured[name]) for name in self.layers], 2)
