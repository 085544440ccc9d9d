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

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from pipeline.core.ekfac import (
    EIGH_DTYPES,
    CovarianceSums,
    EKFACFactors,
    Eigenbases,
    FactorsMeta,
    LambdaSums,
    eigendecompose,
)
from pipeline.core.fingerprint import model_fingerprint
from pipeline.core.forward import sequence_losses
from pipeline.core.projection import ProjectionSpec, Projector
from pipeline.core.queries import QueryGradients, low_rank
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
PRODUCT_DTYPES = ("float32", "bfloat16")
# The scoring products also take int8 (symmetric scales per token and per query column, int32 sums): the
# fit's covariances and rotations need more than int8's 8 bits, so it is scoring only. "auto": the fastest of
# them that the device multiplies fast, as measured (``InfluenceEngine._products``).
SCORE_PRODUCT_DTYPES = (*PRODUCT_DTYPES, "int8", "auto")
DEFAULT_MAX_QUERY_BYTES = 8 * 2**30


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
    product_dtype: ``float32`` (default here; the attribution job's default
        is ``auto``), ``bfloat16``, ``int8`` or ``auto``: with low-rank
        queries scored per token, the two large products per layer take their
        inputs rounded to bfloat16, or quantised to int8 with a scale per
        token and per query column (``QueryGradients.token_scores``); ignored
        at ``precision=float64`` and on devices without fast bfloat16
        (``fast_bfloat16``) or int8 (``fast_int8``). ``auto``: bfloat16 where
        it is fast, else int8 where that is, else float32.
    fit_product_dtype: the same for the fit's per-token products (the
        covariances ``a a^T``, ``g g^T`` and Lambda's rotation into the
        eigenbasis); ``float32`` by default, ``bfloat16`` is
        ``factors.product_dtype``.
    eigh_dtype: ``float64`` (default here, the reference) or ``float32``
        (``factors.eigh_dtype``): the dtype the fit eigendecomposes ``A`` and
        ``S`` in (``eigendecompose``); float64 at ``precision=float64``.
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
    product_dtype: str = "float32"
    fit_product_dtype: str = "float32"
    eigh_dtype: str = "float64"
    max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"factors.damping must be >= 0 or null, got {self.damping}")
        if self.product_dtype not in SCORE_PRODUCT_DTYPES:
            raise ValueError(
                f"score.product_dtype must be one of {SCORE_PRODUCT_DTYPES}, got {self.product_dtype!r}"
            )
        if self.fit_product_dtype not in PRODUCT_DTYPES:
            raise ValueError(f"factors.product_dtype must be one of {PRODUCT_DTYPES}, got {self.fit_product_dtype!r}")
        if self.eigh_dtype not in EIGH_DTYPES:
            raise ValueError(f"factors.eigh_dtype must be one of {EIGH_DTYPES}, got {self.eigh_dtype!r}")
        if self.query_rank < 0:
            raise ValueError(f"query_rank must be >= 0, got {self.query_rank}")
        if self.max_query_bytes <= 0:
            raise ValueError(f"max_query_bytes must be > 0, got {self.max_query_bytes}")

    @property
    def fit_eigh_dtype(self) -> str:
        """The dtype the fit eigendecomposes in: ``eigh_dtype``, but float64 at ``precision=float64``."""
        return "float64" if self.precision == "float64" else self.eigh_dtype

    @property
    def factor_space(self) -> str:
        """Where EK-FAC is fitted: ``projected`` only in curvature mode."""
        return "projected" if self.projection.enabled and self.projection.mode == "curvature" else "full"


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
        # The dtype of the low-rank scoring products (None: the captured vectors' own). bfloat16 and int8 only
        # where the device multiplies them fast; elsewhere they would be slower than float32, so float32 is
        # used (logged).
        self.products = self._products(config.product_dtype, "score.product_dtype")
        self.fit_products = self._products(config.fit_product_dtype, "factors.product_dtype")
        # The preconditioning range finder's power iterations: bfloat16 where fast whatever the scoring
        # products (int8 would be too coarse to choose a subspace with).
        self.range_products = self._products("bfloat16", "") if self.products is not None else None
        self.eigh_dtype = getattr(torch, config.fit_eigh_dtype)
        self.layers = find_tracked_layers(self.model, config.modules)
        prepare_model(self.model, self.layers)
        self.projector = (
            Projector(config.projection, self.layers, self.device, self.dtype) if config.projection.enabled else None
        )
        self._fingerprint: str | None = None
        self._capture_observer: Callable[[dict[str, Captured]], None] | None = None

    def _products(self, name: str, key: str) -> torch.dtype | None:
        """``torch.bfloat16`` / ``torch.int8`` for that ``name`` on float32 captures and a device fast at it.

        Otherwise None (the captures' dtype), logged under ``key`` (nothing logged for an empty key).
        ``auto``: bfloat16 where the device has fast bfloat16 (AMX, tensor cores: 0.85-1.10x the ceiling on
        SmolLM2 against float32's 0.65x), else int8 where it has fast int8 (VNNI CPUs without AMX: 1.01x
        against 0.73x), else float32 (docs/figures.md, "Products in bfloat16" and "Products in int8").
        """
        if self.dtype != torch.float32 or name == "float32":
            return None
        fast = {"bfloat16": fast_bfloat16, "int8": fast_int8}
        chosen = next((n for n in (fast if name == "auto" else (name,)) if fast[n](self.device)), "float32")
        if key and chosen != name:
            log.info("%s=%s: multiplying in %s on %s", key, name, chosen, self.device)
        return None if chosen == "float32" else getattr(torch, chosen)

    @property
    def products_name(self) -> str:
        """The dtype the scoring products run in on this device (``score.product_dtype`` resolved), by name."""
        return str(self.products or self.dtype).removeprefix("torch.")

    @contextlib.contextmanager
    def observing_captures(self, observer: Callable[[dict[str, Captured]], None] | None) -> Iterator[None]:
        """While open, every ``capture_batch`` also hands its captured vectors to ``observer`` (None: no-op).

        How the gradient store (`pipeline.store`) takes the score pass's own
        captures: no second forward or backward, the scoring code unchanged.
        """
        previous, self._capture_observer = self._capture_observer, observer
        try:
            yield
        finally:
            self._capture_observer = previous

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
        self, batch: Batch, projected: bool, label_mode: str = "data", seed: int = 0
    ) -> tuple[dict[str, Captured], torch.Tensor]:
        """One forward and backward: per-layer captured vectors and per-sequence losses.

        ``seed``: of the sampled labels (``label_mode="sampled"``; see `sequence_losses`).
        """
        batch = batch.to(self.device)
        capture = self._capture(projected)
        with capture.recording(batch.attention_mask):
            losses = sequence_losses(self.model, batch, label_mode, seed, self.config.precision)
        captured = capture.backward(losses.sum())
        if self._capture_observer is not None:
            self._capture_observer(captured)
        return captured, losses.detach()

    # ---- fitting -------------------------------------------------------------------------

    @property
    def _label_mode(self) -> str:
        return "data" if self.config.empirical_fisher else "sampled"

    def covariance_sums(
        self, batches: Iterable[Batch], into: CovarianceSums | None = None
    ) -> CovarianceSums:
        """First pass: ``A`` and ``S`` sums over the batches (one fit unit's partial result).

        ``into``: sums to add to, in place (a fit unit's earlier batches), instead of fresh zeros.
        Sampled labels are drawn per window for ``config.seed`` (`label_uniforms`), so the sums
        do not depend on how the windows are batched or split into units.
        """
        projected = self.config.factor_space == "projected"
        sums = into if into is not None else CovarianceSums.zeros(self.space_dims(projected), self.device, self.dtype)
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected, self._label_mode, self.config.seed)
            captured, mask, dropped = _finite_sequences(captured, batch.attention_mask.to(self.device), batch)
            sums.nonfinite.extend(dropped)
            if mask.shape[0]:
                sums.update(captured, mask, self.fit_products)
        return sums

    def lambda_sums(
        self, batches: Iterable[Batch], bases: Eigenbases, into: LambdaSums | None = None
    ) -> LambdaSums:
        """Second pass: eigenvalue-correction sums in the fitted eigenbases (``into``: as ``covariance_sums``).

        Its sampled labels are fresh draws (seed ``config.seed + 1``), as in the paper's second pass.
        """
        projected = self.config.factor_space == "projected"
        sums = into if into is not None else LambdaSums.zeros(self.space_dims(projected), self.device, self.dtype)
        # The bases in the dtype the rotation multiplies in, once (not per batch in LambdaSums.update).
        dtype = self.fit_products or self.dtype
        bases = Eigenbases({n: q.to(self.device, dtype) for n, q in bases.q_a.items()}, bases.l_a,
                           {n: q.to(self.device, dtype) for n, q in bases.q_s.items()}, bases.l_s, bases.num_tokens)
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected, self._label_mode, self.config.seed + 1)
            captured, mask, dropped = _finite_sequences(captured, batch.attention_mask.to(self.device), batch)
            sums.nonfinite.extend(dropped)
            if mask.shape[0]:
                sums.update(captured, bases, mask.shape[0], products=self.fit_products)
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
        bases = eigendecompose(self.covariance_sums(batches), self.eigh_dtype)
        return EKFACFactors.from_parts(self.factors_meta(), bases, self.lambda_sums(batches, bases))

    def check_factors(self, factors: EKFACFactors) -> None:
        space = self.config.factor_space
        projection = self.config.projection.to_json() if space == "projected" else {}
        factors.check_compatible(self.fingerprint, self.layers, space, projection)

    # ---- queries -------------------------------------------------------------------------

    @property
    def query_factors_dtype(self) -> torch.dtype:
        """The dtype low-rank query factors are kept and stored in: the scoring products' (bfloat16 by default).

        The token path rounds them to ``products`` anyway, so keeping them so
        halves their memory and file at the same scores; the ``sequence`` path
        multiplies the (rounded) factors in the vectors' dtype. With int8
        products they are kept in bfloat16 (its rounding, relative 2^-9, is
        below int8's).
        """
        return torch.bfloat16 if self.products is not None else self.dtype

    def query_bytes(self, num_queries: int, rank: int | None = None) -> int:
        """Bytes of ``num_queries`` stored query gradients at ``rank`` (default: the config's; 0 = dense)."""
        rank = self.config.query_rank if rank is None else rank
        size = torch.empty((), dtype=self.dtype if rank == 0 else self.query_factors_dtype).element_size()
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
            finite = _all_finite(pre)
            if rank == 0:
                return pre, finite
        else:
            # Compress in the eigenbasis: H^-1 G = Q_S M Q_A^T with M = rotated / (Lambda + lambda),
            # so M's best rank-r factors rotated by Q_S and Q_A are H^-1 G's; H^-1 G is never formed.
            pre = factors.precondition_rotated(name, captured, damping, path)
            # M is finite when the captured vectors are (Lambda + lambda > 0); an overflow in between shows in
            # the factors, checked below. Cheaper than scanning M, which is d_out x d_in per query.
            finite = _all_finite(captured.g) & _all_finite(captured.a)
        if not finite.all():  # a non-finite matrix would break the solver; the caller reports the query
            pre = torch.where(finite[:, None, None], pre, 0)
        left, right = low_rank(pre, rank, products=self.range_products)
        finite = finite & _all_finite(left) & _all_finite(right)
        if sketch:
            return (left, right), finite
        q_s, q_a = factors.bases(name, captured.g)
        return (_rotate_columns(q_s, left), _rotate_columns(q_a, right)), finite

    def query_gradients(
        self, batches: Iterable[Batch], factors: EKFACFactors, query_ids: list[str], path: str | None = None
    ) -> QueryGradients:
        """Preconditioned query gradients ``H^-1 G_q`` (projected when projection is on), stacked.

        Their memory is checked (``check_query_memory``) before any is formed.
        Each batch is captured once for all layers; then layer by layer the
        batch's gradients are preconditioned and, with ``query_rank > 0``,
        compressed, so only one layer's dense results of one batch are alive
        at a time; each batch's results are copied straight into the stored
        tensors (low-rank factors in ``query_factors_dtype``), allocated once
        (``query_bytes``), with no float32 parts to join. ``path`` forces the
        rotation path (tests).
        """
        self.check_factors(factors)
        self.check_query_memory(len(query_ids))
        projected_fit = self.config.factor_space == "projected"
        low_rank = self.config.query_rank > 0
        total = len(query_ids)
        # Each batch's results are copied into tensors for every query, made at the first batch in the stored
        # dtype: no list of per-batch parts (float32 before) joined into a second copy at the end.
        stored: dict[str, dict[str, torch.Tensor]] = {"dense": {}, "left": {}, "right": {}}
        sides = ("left", "right") if low_rank else ("dense",)
        finite: list[torch.Tensor] = []
        start = 0
        for batch in batches:
            captured, _ = self.capture_batch(batch, projected_fit, "data")
            size = batch.input_ids.shape[0]
            if start + size > total:
                raise ValueError(f"more query gradients than the {total} query ids")
            ok = torch.ones(size, dtype=torch.bool, device=self.device)
            for name in self.layers:
                part, layer_ok = self._precondition_layer(name, captured.pop(name), factors, path)
                ok &= layer_ok
                for side, t in zip(sides, part if low_rank else (part,)):
                    if name not in stored[side]:
                        dtype = self.query_factors_dtype if low_rank else t.dtype
                        stored[side][name] = t.new_empty((total, *t.shape[1:]), dtype=dtype)
                    stored[side][name][start : start + size].copy_(t)
            finite.append(ok)
            start += size
        if start != total:
            raise ValueError(f"{start} query gradients for {total} query ids")
        ok = torch.cat(finite).cpu()
        bad = [query_ids[i] for i in (~ok).nonzero().flatten().tolist()]
        if bad:
            raise NonFiniteGradientError(f"non-finite gradient for queries {bad[:10]}")
        return QueryGradients(query_ids, **stored)

    # ---- scoring -------------------------------------------------------------------------

    def score_batch(self, batch: Batch, queries: QueryGradients, per_layer: bool = False):
        """Scores ``(batch, Q)`` of training sequences against every query.

        With ``per_layer``, also returns ``(batch, Q, layers)`` in ``self.layers`` order.
        Non-finite scores are returned as they are: ``ShardWorker.score`` leaves their windows out
        of the ranking and counts them in the shard's commit.
        """
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        layer_scores = [queries.layer_scores(name, captured[name], products=self.products) for name in self.layers]
        total = torch.stack(layer_scores, -1).sum(-1)
        return (total, torch.stack(layer_scores, -1)) if per_layer else total

    def score_breakdown(
        self, batch: Batch, queries: QueryGradients
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In one pass: scores ``(batch, Q)``, per layer ``(batch, Q, layers)``, per token ``(batch, Q, tokens)``.

        For low-rank queries this costs what scoring by the ``token`` path
        does (the per-token terms are kept, summed over layers); with dense
        queries ``T d_out d_in`` per query and sequence: use ``score_batch``
        and ``token_scores`` on the few windows that need the breakdown.
        """
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        per_token = None
        per_layer = []
        for name in self.layers:
            tokens = queries.token_scores(name, captured.pop(name), self.products)  # (B, Q, T)
            per_layer.append(tokens.sum(-1))
            per_token = tokens if per_token is None else per_token + tokens
        layers = torch.stack(per_layer, -1)
        return layers.sum(-1), layers, per_token

    def token_scores(self, batch: Batch, queries: QueryGradients) -> torch.Tensor:
        """Per-token, per-layer scores ``(batch, Q, layers, tokens)``; they sum to ``score_batch``."""
        captured, _ = self.capture_batch(batch, projected=True, label_mode="data")
        return torch.stack([queries.token_scores(name, captured[name], self.products) for name in self.layers], 2)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware fast enough to beat float32.

    CUDA: bfloat16 tensor cores (compute capability 8.0 and later, not emulation). CPU: AMX tiles
    (torch's CPU feature probe; False where this torch has none). AVX512-BF16 alone does not count:
    on the 2-core Xeon VM with AMX hidden by its hypervisor, SmolLM2's score pass took 31.4 s with
    bfloat16 products against 21.0 s in float32 (docs/figures.md, "Products in bfloat16").
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def fast_int8(device: torch.device) -> bool:
    """Whether ``device`` multiplies int8 matrices into int32 (``torch._int_mm``) faster than float32.

    CPU: x86 VNNI (torch's CPU feature probe): on the 2-core Xeon VM without
    AMX a 1,024 x 1,536 by 1,536 x 2,400 product took 15 ms against 50 ms in
    float32 (docs/figures.md, "Products in int8"); on an AVX2-only AMD EPYC
    (no VNNI) ``_int_mm`` took 2,971 ms against 63 ms. CUDA: not measured, so
    False (``int8`` multiplies in float32 there; ``auto`` takes bfloat16).
    """
    if device.type != "cpu" or not hasattr(torch, "_int_mm"):
        return False
    return bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def _rotate_columns(basis: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``basis @ factors`` for ``(k, k)`` and ``(Q, k, r)`` as one ``(k, k) x (k, Q r)`` product (a view).

    The same numbers as the broadcast product, about 1.3x faster on CPU.
    """
    q, k, r = factors.shape
    return (basis @ factors.permute(1, 0, 2).reshape(k, q * r)).reshape(k, q, r).permute(1, 0, 2)


def _finite_sequences(
    captured: dict[str, Captured], mask: torch.Tensor, batch: Batch
) -> tuple[dict[str, Captured], torch.Tensor, list[int]]:
    """The batch's sequences whose captured vectors are finite in every layer: ``(captured, mask, dropped)``.

    A fit pass leaves a sequence with a NaN or infinite gradient or input out (``dropped``: their
    `window_key` s, or batch rows for a batch without keys), as scoring leaves such windows out of the
    ranking: one would make every layer's sums, hence the factors, NaN. Checked on per-sequence sums of
    the vectors (one reduction per layer; a NaN or infinity makes its sum non-finite): on SmolLM2-135M's
    90 MLP layers, 8 windows of 128 tokens, 80 ms against the batch's 14-16 s capture (one thread).
    """
    ok = None
    for c in captured.values():
        finite = torch.isfinite(c.a.sum((1, 2))) & torch.isfinite(c.g.sum((1, 2)))
        ok = finite if ok is None else ok & finite
    if ok is None or bool(ok.all()):
        return captured, mask, []
    bad = (~ok).nonzero().squeeze(1).cpu()
    dropped = [int(batch.keys[i]) if batch.keys is not None else int(i) for i in bad]
    keep = ok.nonzero().squeeze(1)
    kept = {n: Captured(c.a[keep], c.g[keep], None if c.mask is None else c.mask[keep]) for n, c in captured.items()}
    log.warning("fit: %d of %d sequences in a batch have non-finite gradients or inputs; left out", len(bad),
                ok.shape[0])
    return kept, mask[keep], dropped


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: whether every entry of each batch row of ``x`` is finite."""
    return torch.isfinite(x).flatten(1).all(1)
