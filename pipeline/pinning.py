"""Pinned factors: which EK-FAC factors a run uses, and why (docs/design.md#nightly-runs).

Factors are fitted on a sample of the corpus; as the corpus grows night after
night the sample's shards change, and with them ``factors_id``. Refitting every
night would change every query id and every shard result. So the factors of a
*fitting setting* (everything in `pipeline.identity.FactorsKey` but the
shards: model, tracked layers, Fisher, space, projection, window, seed,
tokenisation, plus ``factors.sample_shards``, ``factors.lambda_sample``,
``factors.lambda_max_documents`` and ``factors.max_documents``) are
pinned at ``{root}/factor_pins/{settings_id}.json`` and reused until:

- the setting changes (a new checkpoint, other layers, window or tokenisation):
  no pin exists for the new setting, so factors are fitted;
- ``factors.refit=true``: refitted on the current sample;
- policy: the pinned factors were fitted on less than ``factors.refit_below_share``
  of the corpus's documents (0, the default, never refits for growth);
- the pinned factors are no longer committed (deleted, corrupted): refitted on
  the same sample (the same id) when its shards are all still in the corpus,
  else on the current sample.

The sample is chosen by hash of shard id (`pipeline.corpus.hash_sample`), so it
is stable as the corpus grows. The decision goes into the run's manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from pipeline import layout
from pipeline.commit import read_file_commit
from pipeline.corpus import Shard
from pipeline.identity import FactorsKey, digest

log = logging.getLogger(__name__)

REUSED, FITTED, REFITTED, POLICY = "reused", "fitted", "refitted", "policy"


def settings_id(key: FactorsKey, sample_shards: int, lambda_sample: float, lambda_max_documents: int = 0,
                max_documents: int = 0) -> str:
    """``p-`` and the digest of the factors key without its shards, with the sampling settings.

    ``lambda_max_documents`` and ``max_documents`` enter only when set (the run passes ``max_documents``
    only when it drops shards: ``RunContext.binding_max_documents``), so the ids of pins made before they
    existed stay.
    """
    setting = {k: v for k, v in key.to_json().items() if k not in ("shards", "lambda_shards")}
    sampling = {"sample_shards": sample_shards, "lambda_sample": lambda_sample}
    if lambda_max_documents:
        sampling["lambda_max_documents"] = lambda_max_documents
    if max_documents:
        sampling["max_documents"] = max_documents
    return "p-" + digest({**setting, **sampling})


@dataclass(frozen=True)
class FactorsPlan:
    """The factors a run uses: their key, the shards that fit them (if they must be fitted) and why."""

    key: FactorsKey
    fit_shards: list[Shard]
    lambda_shards: list[Shard]
    settings_id: str
    decision: str  # reused | fitted | refitted | policy
    reason: str
    fitted_docs: int  # documents in the fitting shards

    def to_json(self, corpus_docs: int) -> dict:
        return {
            "id": self.key.id,
            "settings_id": self.settings_id,
            "decision": self.decision,
            "reason": self.reason,
            "fitted_docs": self.fitted_docs,
            "corpus_docs": corpus_docs,
            "fitted_share": round(self.fitted_docs / corpus_docs, 6) if corpus_docs else None,
        }


def plan_factors(storage, fresh: FactorsKey, fit_shards: list[Shard], lambda_shards: list[Shard],
                 shards: list[Shard], sample_shards: int, lambda_sample: float, refit: bool,
                 refit_below_share: float, lambda_max_documents: int = 0, max_documents: int = 0) -> FactorsPlan:
    """Decide which factors the run uses. ``fresh`` is the key a fit on the current sample would have.

    ``fit_shards``/``lambda_shards``: the current sample; ``shards``: the whole corpus listing.
    """
    sid = settings_id(fresh, sample_shards, lambda_sample, lambda_max_documents, max_documents)
    num_docs = sum(s.num_docs for s in shards)
    fresh_docs = sum(s.num_docs for s in fit_shards)

    def fit_now(decision: str, reason: str) -> FactorsPlan:
        return FactorsPlan(fresh, fit_shards, lambda_shards, sid, decision, reason, fresh_docs)

    if refit:
        return fit_now(REFITTED, "factors.refit=true: fitted on the current sample")
    pin = read_pin(storage, sid)
    if pin is None:
        return fit_now(FITTED, "no factors pinned yet for this model, tracked layers, Fisher, space, window, "
                               "tokenisation and fitting sample (factors.sample_shards, lambda_sample, "
                               "lambda_max_documents, and max_documents where it leaves documents out)")
    pinned = FactorsKey.from_json(pin["key"])
    share = pin["fitted_docs"] / num_docs if num_docs else 1.0
    if share < refit_below_share:
        return fit_now(POLICY, f"the pinned factors {pinned.id} were fitted on {share:.1%} of the corpus's "
                               f"documents, below factors.refit_below_share={refit_below_share}")
    by_id = {s.shard_id: s for s in shards}
    if read_file_commit(storage, layout.factors_file(storage.root, pinned.id)) is not None:
        fit = [by_id[i] for i in pinned.shards if i in by_id]
        return FactorsPlan(pinned, fit, [], sid, REUSED,
                           f"pinned factors reused ({share:.1%} of the corpus's documents fitted)", pin["fitted_docs"])
    lam_ids = pinned.lambda_shards if pinned.lambda_shards is not None else pinned.shards
    if all(i in by_id for i in pinned.shards):
        return FactorsPlan(pinned, [by_id[i] for i in pinned.shards], [by_id[i] for i in lam_ids], sid, REFITTED,
                           f"the pinned factors {pinned.id} are not committed; refitted on the same sample",
                           pin["fitted_docs"])
    return fit_now(REFITTED, f"the pinned factors {pinned.id} are not committed and some of their shards are no "
                             "longer in the corpus; fitted on the current sample")


def read_pin(storage, sid: str) -> dict | None:
    try:
        return storage.read_json(layout.factors_pin(storage.root, sid))
    except FileNotFoundError:
        return None


def write_pin(storage, plan: FactorsPlan, corpus_docs: int, run_id: str) -> None:
    """Pin ``plan``'s factors for its setting (after they are committed). Concurrent refits: the last one wins."""
    storage.write_json(layout.factors_pin(storage.root, plan.settings_id), {
        "factors_id": plan.key.id,
        "key": plan.key.to_json(),
        "fitted_docs": plan.fitted_docs,
        "corpus_docs": corpus_docs,
        "pinned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "run_id": run_id,
    })
    log.info("factors %s pinned for settings %s", plan.key.id, plan.settings_id)
