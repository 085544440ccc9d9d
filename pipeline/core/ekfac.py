"""EK-FAC factors: covariance sums, eigendecomposition, eigenvalue correction.

Workers produce *unnormalised sums plus counts* (``CovarianceSums``,
``LambdaSums``); these add exactly across shards, so fitting is a map-reduce:
``sum(parts).finalize()`` equals fitting in one go. The sums of each layer
group are eigendecomposed once (float64, or float32 when asked:
``eigendecompose``; on the workers, ``layer_groups``). Everything here is
pure tensor code; ``write_factors`` writes a factors file from the fit's
parts and ``EKFACFactors.from_buffer`` reads one, each layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

from pipeline.core.serialization import SafetensorsView, tensors_from_bytes, tensors_to_bytes, write_tensors
from pipeline.core.tracking import Captured, LayerSpec

FACTORS_FORMAT = "ekfac-v1"


class FactorMismatchError(ValueError):
    """Factors that do not belong to the model, modules or projection in use."""


def _add_dicts(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if x.keys() != y.keys():
        raise FactorMismatchError(f"partial sums over different layers: {sorted(x)} vs {sorted(y)}")
    return {k: x[k] + y[k].to(x[k].device) for k in x}


def _add_dicts_(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    """``x += y`` tensor by tensor, in place (no second copy of the sums)."""
    if x.keys() != y.keys():
        raise FactorMismatchError(f"partial sums over different layers: {sorted(x)} vs {sorted(y)}")
    for k in x:
        x[k] += y[k].to(x[k].device)


# Gram matrices at least this wide are computed block row by block row on and above the diagonal
# and mirrored (``gram``): GRAM_BLOCKS blocks do (GRAM_BLOCKS + 1) / (2 GRAM_BLOCKS) of the products.
GRAM_MIN_WIDTH = 1024
GRAM_BLOCKS = 4


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` of ``(N, d)`` vectors, exactly symmetric.

    For ``d >= GRAM_MIN_WIDTH`` (an MLP's wide side) only the blocks on and
    above the diagonal are multiplied and the rest mirrored: 5/8 of the
    products with 4 blocks (measured on 1,024 x 1,536 float32, one thread:
    18 ms against 24 ms for ``x.T @ x``). Narrower ones take one product.
    """
    d = x.shape[-1]
    if d < GRAM_MIN_WIDTH:
        return x.T @ x
    step = -(-d // GRAM_BLOCKS)
    out = x.new_empty(d, d)
    for i in range(0, d, step):
        block = x[:, i : i + step].T @ x[:, i:]  # rows i..i+step, columns i..d
        out[i : i + step, i:] = block
        out[i + step :, i : i + step] = block[:, step:].T
    return out


def partial_sums_dtype(name: str) -> torch.dtype | None:
    """The dtype a stored partial sum (``::A_sum``, ``::S_sum``, ``::Lambda_sum``) is summed in: float64.

    A shard's partial sums are stored in the dtype of the vectors they were
    made from (float32 in production: half the bytes of float64, and rounding
    them, relative 6e-8, is below that of the products themselves; float64
    for references); whoever adds them (a worker eigendecomposing a layer
    group, the driver for Lambda) adds them in float64. Pass as ``cast`` when
    reading them.
    """
    return torch.float64 if name.endswith(("::A_sum", "::S_sum", "::Lambda_sum")) else None


@dataclass
class CovarianceSums:
    """``A_sum = sum a a^T`` and ``S_sum = sum g g^T`` over unmasked tokens.

    Accumulated in the dtype ``zeros`` was given: the engine's (float32 in
    production, float64 for references) within a shard; shards are added in
    float64 where they are added. Within a shard of ``B`` batches float32 adds at most
    about ``B * 6e-8`` relative rounding (1e-4 at 1,600 batches), far below
    the bfloat16 rounding of the products' inputs and outputs themselves.
    """

    a_sum: dict[str, torch.Tensor]
    s_sum: dict[str, torch.Tensor]
    num_tokens: int = 0
    # The window keys (or batch rows) of sequences left out for non-finite vectors (not stored in files).
    nonfinite: list[int] = field(default_factory=list)

    @classmethod
    def zeros(
        cls, dims: dict[str, tuple[int, int]], device="cpu", dtype: torch.dtype = torch.float64
    ) -> "CovarianceSums":
        """``dims[name] = (d_out, d_in)`` in the space the vectors are captured in; sums kept in ``dtype``."""
        return cls(
            {n: torch.zeros(d_in, d_in, dtype=dtype, device=device) for n, (d_out, d_in) in dims.items()},
            {n: torch.zeros(d_out, d_out, dtype=dtype, device=device) for n, (d_out, d_in) in dims.items()},
        )

    def update(self, captured: dict[str, Captured], mask: torch.Tensor, products: torch.dtype | None = None) -> None:
        """Add one batch; ``mask``: ``(batch, tokens)``. Masked vectors are already zero.

        Padding adds nothing, so only the real tokens enter the products
        (``mask`` picks them; a capture's own mask is the same one).
        ``products`` (e.g. ``torch.bfloat16``): the vectors are rounded to it
        for the products (matrix units); on CPU the products also come back in
        it (torch has no float32-output bfloat16 matmul there), and the batch's
        sums are added into the accumulators' dtype.
        """
        self.num_tokens += int(mask.sum())
        flat = mask.reshape(-1).to(torch.bool)
        real = None if bool(flat.all()) else flat.nonzero().squeeze(1)
        for name, c in captured.items():
            a = c.a.reshape(-1, c.a.shape[-1])
            g = c.g.reshape(-1, c.g.shape[-1])
            if real is not None:
                a, g = a[real], g[real]
            if products is not None:
                a, g = a.to(products), g.to(products)
            # Sum per batch in the products' dtype; accumulate across batches in the sums' own (in place).
            self.a_sum[name] += gram(a)
            self.s_sum[name] += gram(g)

    def __add__(self, other: "CovarianceSums") -> "CovarianceSums":
        return CovarianceSums(
            _add_dicts(self.a_sum, other.a_sum), _add_dicts(self.s_sum, other.s_sum), self.num_tokens + other.num_tokens,
            self.nonfinite + other.nonfinite,
        )

    def __iadd__(self, other: "CovarianceSums") -> "CovarianceSums":
        _add_dicts_(self.a_sum, other.a_sum)
        _add_dicts_(self.s_sum, other.s_sum)
        self.num_tokens += other.num_tokens
        self.nonfinite += other.nonfinite
        return self

    def to_tensors(self, dtype: torch.dtype = torch.float64, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The sums as named tensors, in ``dtype`` (see ``partial_sums_dtype``); ``names``: those layers only."""
        names = list(self.a_sum) if names is None else names
        out = {f"{n}::A_sum": self.a_sum[n].to(dtype) for n in names}
        out.update({f"{n}::S_sum": self.s_sum[n].to(dtype) for n in names})
        out["::num_tokens"] = torch.tensor([self.num_tokens], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "CovarianceSums":
        a = {k[: -len("::A_sum")]: v for k, v in tensors.items() if k.endswith("::A_sum")}
        s = {k[: -len("::S_sum")]: v for k, v in tensors.items() if k.endswith("::S_sum")}
        return cls(a, s, int(tensors["::num_tokens"].item()))


@dataclass
class Eigenbases:
    """Eigendecompositions of the normalised ``A`` and ``S`` per layer (float64, or float32 when asked)."""

    q_a: dict[str, torch.Tensor]
    l_a: dict[str, torch.Tensor]
    q_s: dict[str, torch.Tensor]
    l_s: dict[str, torch.Tensor]
    num_tokens: int

    def to_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name}::Q_A`` and ``{name}::Q_S`` (in ``dtype``, or as decomposed) and ``::num_tokens``."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        out = {f"{n}::Q_A": cast(t) for n, t in self.q_a.items()}
        out.update({f"{n}::Q_S": cast(t) for n, t in self.q_s.items()})
        out["::num_tokens"] = torch.tensor([self.num_tokens], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Eigenbases":
        """The bases of ``to_tensors`` (without eigenvalues: the fit's Lambda pass replaces them)."""
        q_a = {k[: -len("::Q_A")]: v for k, v in tensors.items() if k.endswith("::Q_A")}
        q_s = {k[: -len("::Q_S")]: v for k, v in tensors.items() if k.endswith("::Q_S")}
        return cls(q_a, {}, q_s, {}, int(tensors["::num_tokens"].item()))

    def update(self, other: "Eigenbases") -> None:
        """Take ``other``'s layers in (another group of layers of the same fit)."""
        if self.num_tokens != other.num_tokens:
            raise ValueError(f"eigenbases of {self.num_tokens} and {other.num_tokens} tokens are not one fit's")
        for mine, theirs in ((self.q_a, other.q_a), (self.l_a, other.l_a), (self.q_s, other.q_s),
                             (self.l_s, other.l_s)):
            mine.update(theirs)


EIGH_DTYPES = ("float32", "float64")
# The fit's layers are eigendecomposed in this many groups (fewer when fewer layers are tracked), one task
# each on the workers (`layer_groups`); a fixed count, so a fit resumed on another number of workers finds
# the same groups in the covariance units it already committed.
EIGH_GROUPS = 32


def layer_groups(dims: dict[str, tuple[int, int]], count: int = EIGH_GROUPS) -> list[list[str]]:
    """The layers of ``dims`` (``name -> (d_out, d_in)``) in ``min(count, len(dims))`` groups of about equal
    eigendecomposition cost (``d_out^3 + d_in^3``): each layer, the costliest first, to the cheapest group
    so far. Deterministic; each group lists its layers in ``dims``' order, and the groups are ordered by
    their first layer."""
    if count < 1:
        raise ValueError(f"layer groups: count must be >= 1, got {count}")
    order = {n: i for i, n in enumerate(dims)}
    bins: list[list[str]] = [[] for _ in range(min(count, len(dims)))]
    load = [0] * len(bins)
    for name in sorted(dims, key=lambda n: (-(dims[n][0] ** 3 + dims[n][1] ** 3), order[n])):
        i = load.index(min(load))
        bins[i].append(name)
        load[i] += dims[name][0] ** 3 + dims[name][1] ** 3
    groups = [sorted(b, key=order.__getitem__) for b in bins]
    return sorted(groups, key=lambda g: order[g[0]])


def eigendecompose(sums: CovarianceSums, dtype: torch.dtype = torch.float64) -> Eigenbases:
    """``A = A_sum / N_tok = Q_A diag(l_A) Q_A^T`` (and likewise ``S``), decomposed in ``dtype``.

    The matrices are normalised and symmetrised in float64, then rounded to
    ``dtype``. float64 (the default) is the reference. float32 takes about
    half the time (a 1536-square matrix: 0.13 s against 0.27 s on 2 cores)
    and gives bases orthonormal to ~6e-6; EK-FAC stays exact in any
    orthonormal basis, because the eigenvalue-correction pass fits ``Lambda``
    in the basis it is given, so only how far the basis is from diagonalising
    ``A`` and ``S`` (relative ~2e-6 off-diagonal) changes the approximation
    (``factors.eigh_dtype``; docs/figures.md, "Eigendecompositions in float32").

    On CPU the matrices are decomposed side by side, one per torch thread,
    each single-threaded, largest first (`_in_parallel`): LAPACK's
    multithreading gains little on matrices this size (measured on the 2-core
    AVX2 VM, float32: 16 matrices of 192-1536 in 1.31 s against 1.74 s one
    after another; 420 of the shapes of SmolLM2's linear layers in 26.8-29.3 s
    against 33.5-35.6 s).
    """
    if sums.num_tokens <= 0:
        raise ValueError("cannot fit EK-FAC factors on zero tokens; the fitting sample is empty")
    jobs = [(side, name) for name in sums.a_sum for side in ("a", "s")]
    by_side = {"a": sums.a_sum, "s": sums.s_sum}

    def one(job: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        m = by_side[job[0]][job[1]].to(torch.float64) / sums.num_tokens
        return torch.linalg.eigh((0.5 * (m + m.T)).to(dtype))

    jobs.sort(key=lambda job: -by_side[job[0]][job[1]].shape[0])  # the largest first: the pool ends together
    on_cpu = all(t.device.type == "cpu" for t in sums.a_sum.values())
    results = dict(zip(jobs, _in_parallel(one, jobs) if on_cpu else map(one, jobs)))
    q_a, l_a, q_s, l_s = {}, {}, {}, {}
    for name in sums.a_sum:
        l_a[name], q_a[name] = results[("a", name)]
        l_s[name], q_s[name] = results[("s", name)]
    return Eigenbases(q_a, l_a, q_s, l_s, sums.num_tokens)


def _in_parallel(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on ``torch.get_num_threads()`` Python threads of one torch thread each
    (torch's operators release the GIL); torch's thread count is restored after."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def per_sequence_gradients(captured: Captured) -> torch.Tensor:
    """``G[n] = sum_t g[n,t] a[n,t]^T``: ``(batch, d_out', d_in')`` from captured vectors."""
    return torch.bmm(captured.g.transpose(1, 2), captured.a)


def per_token(captured: Captured, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x @ matrix`` for ``x`` ``(batch, tokens, d)`` of ``captured``, multiplying only its real tokens.

    Padded positions (zero vectors) stay zero; the product is done on the
    ``captured.real_tokens()`` rows alone, so padding costs no multiply-adds.
    """
    real = captured.real_tokens()
    if real is None:
        return x @ matrix
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_zeros(flat.shape[0], matrix.shape[-1])
    out[real] = flat[real] @ matrix
    return out.reshape(*x.shape[:-1], matrix.shape[-1])


ROTATION_PATHS = ("token", "sequence")


def rotation_path(tokens: int, d_out: int, d_in: int) -> str:
    """The cheaper way to form ``Q_S^T G Q_A`` for sequences of ``tokens`` (padded) tokens.

    ``token`` rotates every token's vectors first, ``(Q_S^T g_t)(Q_A^T a_t)^T``
    summed over t: ``T (d_out^2 + d_in^2 + d_out d_in)`` multiply-adds per
    sequence. ``sequence`` forms ``G`` then rotates it: ``T d_out d_in +
    d_out d_in (d_out + d_in)``. Both are a few large float32 matmuls of
    similar efficiency on CPU (measured: 45-70 GFLOP/s each on 2 cores), so the
    multiply-add count decides; for a 576 x 1536 layer the break-even is
    about 690 tokens.
    """
    per_token = tokens * (d_out * d_out + d_in * d_in + d_out * d_in)
    per_sequence = tokens * d_out * d_in + d_out * d_in * (d_out + d_in)
    return "token" if per_token < per_sequence else "sequence"


def rotated_gradients(
    captured: Captured, q_s: torch.Tensor, q_a: torch.Tensor, path: str | None = None
) -> torch.Tensor:
    """``Q_S^T G[n] Q_A`` for every sequence: ``(batch, d_out, d_in)``.

    ``q_s``: ``(d_out, d_out)``, ``q_a``: ``(d_in, d_in)`` in the captured
    vectors' dtype and device. ``path`` (``token``/``sequence``) forces a path;
    by default ``rotation_path`` picks the cheaper one for this shape.
    """
    g, a = captured.g, captured.a
    path = path or rotation_path(g.shape[1], g.shape[-1], a.shape[-1])
    if path == "token":
        # The transposed factor made contiguous first: a product with the transposed view was 1.4-2x slower in
        # bfloat16 on CPU (copy included), about the same in float32.
        return torch.bmm(per_token(captured, g, q_s).transpose(1, 2).contiguous(), per_token(captured, a, q_a))
    if path != "sequence":
        raise ValueError(f"rotation path must be one of {ROTATION_PATHS}, got {path!r}")
    return q_s.T @ (per_sequence_gradients(captured) @ q_a)


@dataclass
class LambdaSums:
    """``sum_n (Q_S^T G[n] Q_A)^2`` per layer, with the sequence count (accumulated as ``CovarianceSums``)."""

    sums: dict[str, torch.Tensor]
    num_sequences: int = 0
    # As ``CovarianceSums.nonfinite``.
    nonfinite: list[int] = field(default_factory=list)

    @classmethod
    def zeros(
        cls, dims: dict[str, tuple[int, int]], device="cpu", dtype: torch.dtype = torch.float64
    ) -> "LambdaSums":
        return cls({n: torch.zeros(d_out, d_in, dtype=dtype, device=device) for n, (d_out, d_in) in dims.items()})

    def update(
        self, captured: dict[str, Captured], bases: Eigenbases, num_sequences: int, path: str | None = None,
        products: torch.dtype | None = None,
    ) -> None:
        """Add one batch of ``num_sequences`` sequences (``path``: see ``rotated_gradients``).

        ``products`` (e.g. ``torch.bfloat16``): the rotation's products take
        their inputs in that dtype (and, on CPU, give their outputs in it); the
        rotated gradients are squared and summed in the vectors' dtype, added
        into the sums' dtype.
        """
        self.num_sequences += num_sequences
        for name, c in captured.items():
            dtype = c.a.dtype if products is None else products
            q_a = bases.q_a[name].to(device=c.a.device, dtype=dtype)
            q_s = bases.q_s[name].to(device=c.g.device, dtype=dtype)
            if products is not None:
                c = Captured(c.a.to(products), c.g.to(products), c.mask)
            rotated = rotated_gradients(c, q_s, q_a, path).to(captured[name].a.dtype)  # a fresh tensor
            # Squared in place: no second full-size (batch, d_out, d_in) temporary per layer.
            self.sums[name] += rotated.square_().sum(0)

    def __add__(self, other: "LambdaSums") -> "LambdaSums":
        return LambdaSums(_add_dicts(self.sums, other.sums), self.num_sequences + other.num_sequences,
                          self.nonfinite + other.nonfinite)

    def __iadd__(self, other: "LambdaSums") -> "LambdaSums":
        _add_dicts_(self.sums, other.sums)
        self.num_sequences += other.num_sequences
        self.nonfinite += other.nonfinite
        return self

    def to_tensors(self, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """The sums as named tensors, in ``dtype`` (see ``partial_sums_dtype``)."""
        out = {f"{n}::Lambda_sum": t.to(dtype) for n, t in self.sums.items()}
        out["::num_sequences"] = torch.tensor([self.num_sequences], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LambdaSums":
        sums = {k[: -len("::Lambda_sum")]: v for k, v in tensors.items() if k.endswith("::Lambda_sum")}
        return cls(sums, int(tensors["::num_sequences"].item()))


@dataclass
class FactorsMeta:
    """What the factors were fitted for; checked before they are used.

    ``space`` is ``full`` (fitted on full-size vectors) or ``projected``
    (projected-curvature mode, with ``projection`` the spec used).
    """

    model_fingerprint: str
    modules_pattern: str
    layers: dict[str, LayerSpec]
    fisher: str  # "sampled" (true Fisher) or "empirical"
    space: str = "full"
    projection: dict = field(default_factory=dict)
    num_tokens: int = 0
    num_sequences: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FACTORS_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "modules_pattern": self.modules_pattern,
            "layers": {n: s.to_json() for n, s in self.layers.items()},
            "fisher": self.fisher,
            "space": self.space,
            "projection": self.projection,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "FactorsMeta":
        if d.get("format") != FACTORS_FORMAT:
            raise FactorMismatchError(f"factors format {d.get('format')!r} is not {FACTORS_FORMAT!r}")
        layers = {n: LayerSpec(**s) for n, s in d["layers"].items()}
        return cls(
            d["model_fingerprint"], d["modules_pattern"], layers, d["fisher"], d["space"], d["projection"],
            d["num_tokens"], d["num_sequences"], d.get("extra", {}),
        )


@dataclass
class EKFACFactors:
    """Fitted EK-FAC: eigenbases plus corrected eigenvalues ``Lambda`` ``(d_out, d_in)`` per layer."""

    meta: FactorsMeta
    q_a: Mapping[str, torch.Tensor]
    q_s: Mapping[str, torch.Tensor]
    lambdas: Mapping[str, torch.Tensor]

    @classmethod
    def from_parts(cls, meta: FactorsMeta, bases: Eigenbases, lambda_sums: LambdaSums) -> "EKFACFactors":
        if lambda_sums.num_sequences <= 0:
            raise ValueError("cannot correct eigenvalues on zero sequences; the fitting sample is empty")
        meta.num_tokens = bases.num_tokens
        meta.num_sequences = lambda_sums.num_sequences
        lambdas = {n: s / lambda_sums.num_sequences for n, s in lambda_sums.sums.items()}
        return cls(meta, dict(bases.q_a), dict(bases.q_s), lambdas)

    def with_bases_in(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "EKFACFactors":
        """These factors with ``Q_A``, ``Q_S`` cast once to ``dtype`` (and moved), as ``bases`` casts them per call.

        The same numbers wherever ``bases`` is asked for that dtype; a float32
        worker then holds half the memory of the float64 bases. ``Lambda`` is unchanged.
        """
        cast = lambda d: {n: t.to(device=device or t.device, dtype=dtype) for n, t in d.items()}  # noqa: E731
        return EKFACFactors(self.meta, cast(self.q_a), cast(self.q_s), self.lambdas)

    def damping(self, name: str, damping: float | None) -> float:
        """A fixed ``damping``, or ``0.1 * mean(Lambda)`` of the layer when ``None``."""
        if damping is not None:
            return float(damping)
        return 0.1 * float(self.lambdas[name].mean(dtype=torch.float64))  # float64 sum whatever Lambda is stored in

    def bases(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_S, Q_A)`` of a layer in ``like``'s dtype and device."""
        return (
            self.q_s[name].to(device=like.device, dtype=like.dtype),
            self.q_a[name].to(device=like.device, dtype=like.dtype),
        )

    def scale_rotated(self, name: str, rotated: torch.Tensor, damping: float | None) -> torch.Tensor:
        """``(Q_S^T X Q_A) / (Lambda + lambda)``: the preconditioner in its eigenbasis."""
        lam = self.lambdas[name].to(device=rotated.device, dtype=rotated.dtype)
        return rotated / (lam + self.damping(name, damping))

    def precondition(self, name: str, grads: torch.Tensor, damping: float | None) -> torch.Tensor:
        """``H^-1 X = Q_S [(Q_S^T X Q_A) / (Lambda + lambda)] Q_A^T``; ``grads``: ``(..., d_out, d_in)``."""
        q_s, q_a = self.bases(name, grads)
        return q_s @ self.scale_rotated(name, q_s.T @ grads @ q_a, damping) @ q_a.T

    def precondition_rotated(
        self, name: str, captured: Captured, damping: float | None, path: str | None = None
    ) -> torch.Tensor:
        """``(Q_S^T G Q_A) / (Lambda + lambda)`` ``(batch, d_out, d_in)`` straight from captured vectors.

        ``G`` is never formed when rotating the tokens first is cheaper (``rotation_path``).
        """
        q_s, q_a = self.bases(name, captured.g)
        return self.scale_rotated(name, rotated_gradients(captured, q_s, q_a, path), damping)

    def precondition_captured(
        self, name: str, captured: Captured, damping: float | None, path: str | None = None
    ) -> torch.Tensor:
        """``H^-1 G[n]`` ``(batch, d_out, d_in)`` for every captured sequence (see ``precondition_rotated``)."""
        q_s, q_a = self.bases(name, captured.g)
        return q_s @ (self.precondition_rotated(name, captured, damping, path) @ q_a.T)

    def check_compatible(self, model_fingerprint: str, layers: dict[str, LayerSpec], space: str, projection: dict) -> None:
        """Raise ``FactorMismatchError`` unless these factors fit this model, layer set and space."""
        m = self.meta
        if m.model_fingerprint != model_fingerprint:
            raise FactorMismatchError(
                f"factors were fitted for model {m.model_fingerprint[:16]}..., but the model in use is "
                f"{model_fingerprint[:16]}...; refit the factors for this model"
            )
        if set(m.layers) != set(layers) or any(m.layers[n] != layers[n] for n in layers):
            raise FactorMismatchError(
                f"factors track layers {sorted(m.layers)[:4]}... (pattern {m.modules_pattern!r}), "
                f"but model.modules selects {sorted(layers)[:4]}...; refit or change model.modules"
            )
        if m.space != space or (space == "projected" and m.projection != projection):
            raise FactorMismatchError(
                f"factors were fitted in the {m.space} space {m.projection or ''}, but scoring needs the "
                f"{space} space {projection if space == 'projected' else ''}; refit with this projection"
            )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.lambdas:
            out[f"{n}::Q_A"] = self.q_a[n].contiguous()
            out[f"{n}::Q_S"] = self.q_s[n].contiguous()
            out[f"{n}::Lambda"] = self.lambdas[n].contiguous()
        return out

    def to_bytes(self) -> bytes:
        """safetensors bytes with the meta as JSON in the header (no pickle)."""
        return tensors_to_bytes(self.to_tensors(), {"meta": json.dumps(self.meta.to_json(), sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, bases_dtype: torch.dtype | None = None) -> "EKFACFactors":
        """Factors from `to_bytes`; ``bases_dtype``: ``Q_A``, ``Q_S`` converted to it while parsing (see ``with_bases_in``)."""
        cast = None if bases_dtype is None else (lambda n: bases_dtype if n.endswith(("::Q_A", "::Q_S")) else None)
        tensors, metadata = tensors_from_bytes(data, cast)
        meta = _factors_meta(metadata)
        q_a = {n: tensors[f"{n}::Q_A"] for n in meta.layers}
        q_s = {n: tensors[f"{n}::Q_S"] for n in meta.layers}
        lam = {n: tensors[f"{n}::Lambda"] for n in meta.layers}
        return cls(meta, q_a, q_s, lam)

    @classmethod
    def from_buffer(cls, data: bytes, bases_dtype: torch.dtype | None = None,
                    lambda_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> "EKFACFactors":
        """Factors of `to_bytes` bytes (or a memory-mapped file) whose layers are read only when asked for.

        ``q_a``, ``q_s`` and ``lambdas`` are read-only mappings: each lookup
        copies that layer's tensor out of ``data`` (bases in ``bases_dtype``,
        ``Lambda`` in ``lambda_dtype``; None: as stored) and moves it to
        ``device``, and each keeps only its latest layer there (so asking for
        it again on that device, as ``bases`` does twice per layer, copies
        nothing). Preconditioning goes layer by layer, so a worker
        holds one layer's factors instead of a copy of the whole file (1.2 GiB
        for SmolLM2's 90 MLP layers, about 70 GB for a 7B model's); the file
        itself stays in ``data`` (the page cache, when it is a memory map).
        """
        view = SafetensorsView(data)
        meta = _factors_meta(view.metadata)
        for n in meta.layers:
            missing = [k for k in ("Q_A", "Q_S", "Lambda") if f"{n}::{k}" not in view]
            if missing:
                raise FactorMismatchError(f"the factors file has no {missing} for layer {n!r} its meta lists")
        names = list(meta.layers)
        layer = lambda suffix, dtype: LayerTensors(view, names, suffix, dtype, device)  # noqa: E731
        return cls(meta, layer("::Q_A", bases_dtype), layer("::Q_S", bases_dtype), layer("::Lambda", lambda_dtype))


def write_factors(out: BinaryIO, meta: FactorsMeta, bases: list[SafetensorsView],
                  lambda_sums: list[SafetensorsView], lambda_dtype: torch.dtype = torch.float64) -> tuple[int, int]:
    """The factors file of a fit's parts written to ``out`` layer by layer; returns ``(num_tokens, num_sequences)``.

    ``bases``: the layer groups' eigenbases files (``Eigenbases.to_tensors``),
    ``lambda_sums``: the Lambda units' partial sums (``LambdaSums.to_tensors``),
    in the fit's order. With ``lambda_dtype`` float64, the same bytes as
    ``EKFACFactors.from_parts(meta, bases, sums).to_bytes()`` of those parts
    read whole (the partial sums added in float64, in order), but each tensor
    is made as the file reaches it: the writer holds one layer's bases or
    Lambda, not the factors twice (parsed, then as bytes: the driver's 4.75 GiB
    peak before for SmolLM2's factors). ``lambda_dtype``: what ``Lambda`` is
    stored in, the float64 mean rounded to it (the driver gives float32 for a
    float32 engine, which divides in float32: 6e-8 relative, a fifth of the
    file saved). ``meta``'s counts are set.
    """
    tokens = {int(v.tensor("::num_tokens").item()) for v in bases}
    if len(tokens) != 1:
        raise ValueError(f"eigenbases of {sorted(tokens)} tokens are not one fit's")
    num_sequences = sum(int(v.tensor("::num_sequences").item()) for v in lambda_sums)
    if num_sequences <= 0:
        raise ValueError("cannot correct eigenvalues on zero sequences; the fitting sample is empty")
    meta.num_tokens, meta.num_sequences = tokens.pop(), num_sequences
    holder = {f"{n}{side}": v for v in bases for n in meta.layers for side in ("::Q_A", "::Q_S") if f"{n}{side}" in v}
    missing = [n for n in meta.layers if f"{n}::Q_A" not in holder or f"{n}::Q_S" not in holder]
    missing += [n for n in meta.layers if any(f"{n}::Lambda_sum" not in v for v in lambda_sums)]
    if missing:
        raise FactorMismatchError(f"the fit's parts lack layers {missing[:4]} of the factors' meta")
    specs = {name: view.spec(name) for name, view in holder.items()}
    first = lambda_sums[0]
    specs.update({f"{n}::Lambda": (lambda_dtype, first.spec(f"{n}::Lambda_sum")[1]) for n in meta.layers})

    def tensor_of(name: str) -> torch.Tensor:
        if name in holder:
            return holder[name].tensor(name)
        layer = name[: -len("::Lambda")]
        total = first.tensor(f"{layer}::Lambda_sum", torch.float64)
        for view in lambda_sums[1:]:
            total += view.tensor(f"{layer}::Lambda_sum", torch.float64)
        return (total / num_sequences).to(lambda_dtype)

    write_tensors(out, specs, tensor_of, {"meta": json.dumps(meta.to_json(), sort_keys=True)})
    return meta.num_tokens, num_sequences


def _factors_meta(metadata: dict[str, str]) -> FactorsMeta:
    if "meta" not in metadata:
        raise FactorMismatchError("the file has no EK-FAC factors meta in its header; it is not a factors file")
    return FactorsMeta.from_json(json.loads(metadata["meta"]))


class LayerTensors(Mapping):
    """One kind of per-layer factor (``suffix``: ``::Q_A``, ``::Q_S``, ``::Lambda``) read from a factors file
    on lookup, in ``dtype`` (None: as stored), on ``device``; the latest layer read is kept, so asking for it
    again (as preconditioning does, once to rotate and once to rotate back) copies nothing."""

    def __init__(self, view: SafetensorsView, names: list[str], suffix: str, dtype: torch.dtype | None,
                 device: torch.device | str = "cpu"):
        self._view, self._names, self._suffix, self._dtype, self._device = view, names, suffix, dtype, device
        self._latest: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._latest is not None and self._latest[0] == name:
            return self._latest[1]
        if name not in self._names:
            raise KeyError(name)
        tensor = self._view.tensor(f"{name}{self._suffix}", self._dtype).to(self._device)
        self._latest = (name, tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
