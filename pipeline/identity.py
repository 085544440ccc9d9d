"""Content-addressed ids of the stored intermediates, each derived from one frozen key.

Fitted factors and preconditioned query gradients are stored under an id that
hashes everything that determines them, so any run that would compute the same
ones reuses them (``pipeline.layout`` turns the ids into paths). The key's JSON
is both what the id hashes and what the artefact's metadata stores
(``FactorsKey.metadata`` goes into ``FactorsMeta.extra``): the id and the record
of what it stands for cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.core.influence import InfluenceConfig
from pipeline.core.projection import ProjectionSpec
from pipeline.core.text import Tokenisation

# The only tokenisation before ``corpus.add_bos``/``add_eos`` existed (no BOS, EOS appended). A key with it
# leaves the field out of its JSON, so the ids of factors and queries fitted before keep their meaning.
_PLAIN = Tokenisation(add_bos=False, add_eos=True)
# What a queries key records for projection off, whatever mode and seed the config gives (they change nothing
# then): the config's default (projection.mode=curvature, seed 0), so the default's ids are the ones it had.
_NO_PROJECTION = ProjectionSpec(0, 0, "curvature")


def _tokenisation_json(tokenisation: Tokenisation) -> dict:
    return {} if tokenisation == _PLAIN else {"tokenisation": tokenisation.to_json()}


def _tokenisation_of(d: dict) -> Tokenisation:
    return Tokenisation(**d["tokenisation"]) if "tokenisation" in d else _PLAIN


def digest(obj) -> str:
    """20 hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FactorsKey:
    """What determines a set of fitted EK-FAC factors."""

    model: str  # the model's fingerprint (weights and config)
    modules: str  # the tracked-modules pattern
    fisher: str  # "sampled" (true Fisher) or "empirical"
    space: str  # "full" or "projected" (curvature mode fits on projected vectors)
    projection: ProjectionSpec | None  # only when the space is projected
    window: int  # tokens per training window
    seed: int  # seed of the sampled Fisher labels
    shards: tuple[str, ...]  # ids of the fitting shards, in order
    # ids of the shards of the eigenvalue-correction (Lambda) pass when a subset of ``shards``
    # (factors.lambda_sample < 1); None: all of them, and the id is the same as before the key existed.
    lambda_shards: tuple[str, ...] | None = None
    # BOS/EOS around every document (corpus.add_bos/add_eos, resolved): they change every window's tokens.
    tokenisation: Tokenisation = _PLAIN
    # factors.product_dtype: "float32" (left out of the JSON, so earlier ids stay) or "bfloat16".
    products: str = "float32"
    # factors.eigh_dtype: "float64" (left out of the JSON, so earlier ids stay) or "float32".
    eigh: str = "float64"
    # model.precision: "float32" (left out of the JSON) or another (float64 references, bf16 autocast): the
    # captured vectors differ, so factors fitted at one precision are not reused at another.
    precision: str = "float32"

    @classmethod
    def of(
        cls, influence: InfluenceConfig, model_fp: str, window: int, shard_ids, lambda_shard_ids=None,
        tokenisation: Tokenisation = _PLAIN,
    ) -> "FactorsKey":
        projected = influence.factor_space == "projected"
        lambda_shards = None if lambda_shard_ids is None else tuple(lambda_shard_ids)
        return cls(
            model=model_fp,
            modules=influence.modules,
            fisher="empirical" if influence.empirical_fisher else "sampled",
            space=influence.factor_space,
            projection=influence.projection if projected else None,
            window=window,
            seed=influence.seed,
            shards=tuple(shard_ids),
            lambda_shards=None if lambda_shards == tuple(shard_ids) else lambda_shards,
            tokenisation=tokenisation,
            products="float32" if influence.precision == "float64" else influence.fit_product_dtype,
            eigh=influence.fit_eigh_dtype,
            precision=influence.precision,
        )

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "modules": self.modules,
            "fisher": self.fisher,
            "space": self.space,
            "projection": None if self.projection is None else self.projection.to_json(),
            "window": self.window,
            "seed": self.seed,
            "shards": list(self.shards),
            **({} if self.lambda_shards is None else {"lambda_shards": list(self.lambda_shards)}),
            **_tokenisation_json(self.tokenisation),
            **({} if self.products == "float32" else {"products": self.products}),
            **({} if self.eigh == "float64" else {"eigh": self.eigh}),
            **({} if self.precision == "float32" else {"precision": self.precision}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "FactorsKey":
        projection = None if d["projection"] is None else ProjectionSpec(**d["projection"])
        lambda_shards = tuple(d["lambda_shards"]) if "lambda_shards" in d else None
        return cls(d["model"], d["modules"], d["fisher"], d["space"], projection, d["window"], d["seed"],
                   tuple(d["shards"]), lambda_shards, _tokenisation_of(d), d.get("products", "float32"),
                   d.get("eigh", "float64"), d.get("precision", "float32"))

    @property
    def id(self) -> str:
        return "f-" + digest(self.to_json())

    def metadata(self) -> dict:
        """What the factors' metadata stores (``FactorsMeta.extra``): the id and the key it hashes."""
        return {"factors_id": self.id, "key": self.to_json()}


@dataclass(frozen=True)
class QueriesKey:
    """What determines a set of preconditioned query gradients."""

    factors: str  # the factors' id
    queries: str  # the queries file's content fingerprint
    damping: float | None  # fixed damping, or None for 0.1 * mean(Lambda) per layer
    projection: ProjectionSpec
    query_rank: int
    window: int
    # BOS before every prompt (corpus.add_bos, resolved); add_eos is here because the factors' id carries it too.
    tokenisation: Tokenisation = _PLAIN
    # score.product_dtype where low-rank queries' range finder and stored factors follow it (query_rank > 0,
    # float32 model): "float32" (left out of the JSON, so earlier ids stay), "bfloat16" or "int8" (factors kept in
    # bfloat16, range finder in bfloat16 where that is fast).
    products: str = "float32"

    @classmethod
    def of(
        cls, influence: InfluenceConfig, factors_id: str, queries_fp: str, window: int,
        tokenisation: Tokenisation = _PLAIN,
    ) -> "QueriesKey":
        compressed = influence.query_rank > 0 and influence.precision != "float64"
        projection = influence.projection if influence.projection.enabled else _NO_PROJECTION
        return cls(factors_id, queries_fp, influence.damping, projection, influence.query_rank, window,
                   tokenisation, influence.product_dtype if compressed else "float32")

    def to_json(self) -> dict:
        return {
            "factors": self.factors,
            "queries": self.queries,
            "damping": self.damping,
            "projection": self.projection.to_json(),
            "query_rank": self.query_rank,
            "window": self.window,
            **_tokenisation_json(self.tokenisation),
            **({} if self.products == "float32" else {"products": self.products}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "QueriesKey":
        return cls(d["factors"], d["queries"], d["damping"], ProjectionSpec(**d["projection"]), d["query_rank"],
                   d["window"], _tokenisation_of(d), d.get("products", "float32"))

    @property
    def id(self) -> str:
        return "q-" + digest(self.to_json())
