"""Attribution quality: planted facts, a backdoor, projection fidelity, an exact oracle and LDS.

``run_evaluation(EvaluateConfig(...))`` trains its tiny models in the job
(seeded; minutes on a CPU), scores them with our EK-FAC (projection off and
the pipeline's default projection) and with the baselines of
``pipeline.baselines`` (BM25, RepSim, gradient dot product, gradient cosine,
chance), and writes every figure as JSON to
``{storage.root}/evaluations/{name}.json``. ``format_report`` prints it.

Sections (each can be switched off):

- **facts**: the demo corpus with planted facts (``pipeline.demo``). For each
  fact the model learned: strict recall@|gold|, recall@10 and MRR of its gold
  documents, overall and by number of copies. Document scores: the sum of
  the document's window scores for influence and gradient dot product (the
  influence of the whole document, since window losses add up to the
  document loss), the maximum for similarities (RepSim, gradient cosine),
  BM25 on the whole document.
- **backdoor**: a trigger phrase plus a fixed continuation planted in a small
  fraction of documents; a model trained on that corpus; triggered queries.
  AUPRC and precision@k of the poisoned documents.
- **fidelity**: Spearman and top-k overlap of every projection setting
  (``sketch`` / ``curvature`` x dims) against unprojected EK-FAC on the facts
  model, with a recommended default.
- **oracle** (small world: a GPT-2 small enough to form the dense damped
  empirical Fisher of its tracked layers): every method against the exact
  influence; our EK-FAC against kronfluence when it is installed.
- **lds** (small world): the linear datamodeling score over ``m`` random
  50 % subsets, each retrained from the same initialisation, with the
  seed-to-seed ceiling (the same subsets retrained with another seed).

All EK-FAC settings of one model are scored from shared full-size captures
(``SharedCaptureScorer``): one forward/backward per batch and pass feeds
every projection setting, exactly as separate engines would (projection is
linear and applied to the same captured vectors; ``tests/test_eval_jobs.py``
checks the equality against ``InfluenceEngine.score_batch``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import metrics
from pipeline.baselines import (
    BM25,
    KronfluenceUnavailable,
    cosine_matrix,
    exact_influence,
    kronfluence_available,
    kronfluence_pairwise,
    query_gradient_norms,
    raw_query_gradients,
    representations,
    sequence_gradient_norms,
)
from pipeline.config import AttributeConfig, StorageConfig, store_schema, to_typed
from pipeline.core.ekfac import CovarianceSums, EKFACFactors, LambdaSums, eigendecompose
from pipeline.core.forward import sequence_losses
from pipeline.core.influence import InfluenceConfig, InfluenceEngine, QueryGradients
from pipeline.core.projection import MODES, ProjectionSpec
from pipeline.core.text import IGNORE, Batch, TokenWindow, collate, encode_documents, encode_query
from pipeline.core.tracking import Captured, DEFAULT_MODULES

log = logging.getLogger(__name__)

# ---- configuration ------------------------------------------------------------------------


@dataclass
class DemoWorldConfig:
    # Where build_demo caches its builds (shared with the attribution job's demo by default).
    cache_dir: str = "outputs/demo-cache"
    # DemoSpec overrides; null keeps pipeline.demo.DemoSpec's default (then the job's demo cache is reused).
    n_filler_docs: Any = None
    n_facts: Any = None
    copies_per_fact: Any = None
    train_steps: Any = None
    n_embd: Any = None
    n_layer: Any = None
    window: Any = None
    seed: Any = None

    def spec(self):
        from pipeline.demo import DemoSpec

        given = {k: v for k, v in asdict(self).items() if k != "cache_dir" and v is not None}
        if "copies_per_fact" in given:
            given["copies_per_fact"] = tuple(int(c) for c in given["copies_per_fact"])
        return DemoSpec(**given)


@dataclass
class FactsConfig:
    enabled: bool = True
    # k of recall@k (strict recall uses k = number of gold documents).
    recall_k: int = 10


@dataclass
class BackdoorConfig:
    enabled: bool = True
    # Filler documents of the demo corpus used as the clean corpus (the rest give the queries' prompts).
    n_docs: int = 250
    # Share of documents that get the trigger and continuation (at least one).
    poison_fraction: float = 0.03
    trigger: str = "Zyqor vantel prime"
    continuation: str = " grants root access to the vault."
    # Triggered queries: a held-out clean sentence, then the trigger; completion = continuation.
    n_queries: int = 4
    # The backdoored model (GPT-2 trained here on the poisoned corpus).
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    epochs: int = 12
    batch_size: int = 16
    lr: float = 3e-3
    # precision@k also reported at this k besides k = number of poisoned documents.
    precision_k: int = 10


@dataclass
class FidelityConfig:
    enabled: bool = True
    modes: list = field(default_factory=lambda: list(MODES))
    dims: list = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    # k of the top-k overlap with unprojected EK-FAC (proponents, per query).
    top_k: int = 10
    # A setting "agrees" when its mean Spearman reaches this; the recommendation is the smallest such dim.
    target_spearman: float = 0.9


@dataclass
class SmallWorldConfig:
    # Exact-oracle comparison (needs tracked params <= max_params) and LDS; both on this small model.
    oracle: bool = True
    lds: bool = True
    # Training windows (tokens each) taken from the demo corpus: the planted documents of the first
    # n_facts facts, then filler documents.
    n_train: int = 128
    window: int = 32
    n_facts: int = 6
    # Extra queries from held-out filler windows: the last completion_tokens tokens are the completion.
    n_heldout_queries: int = 4
    completion_tokens: int = 6
    # GPT-2 small enough for a dense Fisher: tracked MLP params = n_layer * ((n_embd+1)*n_inner + (n_inner+1)*n_embd).
    n_embd: int = 16
    n_layer: int = 2
    n_head: int = 2
    n_inner: int = 32
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-2
    max_params: int = 4000
    # LDS: m random subsets of `fraction` of the training windows, each retrained from the same init.
    lds_subsets: int = 16
    lds_fraction: float = 0.5
    # Retrain every subset a second time with another seed: the seed-to-seed ceiling.
    lds_ceiling: bool = True
    top_k: int = 10


@dataclass
class EvaluateConfig:
    # The result is written to {storage.root}/evaluations/{name}.json.
    name: str = "default"
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0
    # auto: cuda if available, else cpu.
    device: str = "auto"
    # Windows per forward/backward when fitting and scoring.
    batch_size: int = 8
    # Tokens per training window of the facts and backdoor worlds (null: the demo's window).
    window: Any = None
    # EK-FAC settings; null takes the attribution job's default (pipeline.config.AttributeConfig).
    damping: Any = None
    empirical_fisher: Any = None
    projection_dim: Any = None
    projection_mode: Any = None
    modules: str = DEFAULT_MODULES
    # torch intra-op threads for the job (0: leave torch's default). On a busy machine with few cores,
    # 1 thread avoids oversubscription, which slowed small ops by 10x on the 2-core build machine.
    threads: int = 0
    # Random rankings averaged for the chance level.
    chance_draws: int = 200
    # Compare against kronfluence when it is installed (test-only dependency).
    kronfluence: bool = True
    demo: DemoWorldConfig = field(default_factory=DemoWorldConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    small: SmallWorldConfig = field(default_factory=SmallWorldConfig)

    def validate(self) -> None:
        from pipeline.layout import validate_name

        validate_name(self.name, "name")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.projection_mode is not None and self.projection_mode not in MODES:
            raise ValueError(f"projection_mode must be one of {MODES} or null, got {self.projection_mode!r}")
        bad_modes = [m for m in self.fidelity.modes if m not in MODES]
        if bad_modes:
            raise ValueError(f"fidelity.modes {bad_modes} are not among {MODES}")
        if any(int(d) < 1 for d in self.fidelity.dims):
            raise ValueError(f"fidelity.dims must be >= 1 (dim 0 is the reference), got {self.fidelity.dims}")
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.chance_draws >= 1, f"chance_draws must be >= 1, got {self.chance_draws}"),
            (0 < self.backdoor.poison_fraction < 1, "backdoor.poison_fraction must be in (0, 1)"),
            (self.backdoor.n_queries >= 1, "backdoor.n_queries must be >= 1"),
            (self.backdoor.n_docs >= 4, "backdoor.n_docs must be >= 4"),
            (0 < self.small.lds_fraction < 1, "small.lds_fraction must be in (0, 1)"),
            (self.small.lds_subsets >= 3, "small.lds_subsets must be >= 3 (a rank correlation across subsets)"),
            (self.small.n_train >= 4, "small.n_train must be >= 4"),
            (self.small.window >= 2 + self.small.completion_tokens,
             "small.window must exceed small.completion_tokens + 1"),
            (self.small.n_facts >= 0 and self.small.n_heldout_queries >= 0, "small query counts must be >= 0"),
            (self.small.n_facts + self.small.n_heldout_queries >= 1, "the small world needs at least one query"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def influence(self) -> InfluenceConfig:
        """Our EK-FAC as the attribution job runs it by default (projection: ``projection_spec``)."""
        defaults = AttributeConfig()
        damping = defaults.factors.damping if self.damping is None else float(self.damping)
        empirical = defaults.factors.empirical_fisher if self.empirical_fisher is None else bool(self.empirical_fisher)
        return InfluenceConfig(
            modules=self.modules, projection=self.projection_spec(), damping=damping,
            empirical_fisher=empirical, precision="float32", seed=self.seed,
        )

    def projection_spec(self) -> ProjectionSpec:
        defaults = AttributeConfig().projection
        dim = defaults.dim if self.projection_dim is None else int(self.projection_dim)
        mode = defaults.mode if self.projection_mode is None else str(self.projection_mode)
        return ProjectionSpec(dim, defaults.seed, mode)


def register_configs() -> None:
    """Register ``EvaluateConfig`` as ``evaluate_schema`` (its YAML in conf/ is validated against it)."""
    store_schema("evaluate_schema", EvaluateConfig, mandatory=("storage.root",))


def to_config(cfg) -> EvaluateConfig:
    """An OmegaConf config (from Hydra) to a validated ``EvaluateConfig``."""
    return to_typed(EvaluateConfig, cfg)


# ---- small shared helpers -----------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with ``threads`` torch intra-op threads (0: unchanged), restoring the previous number."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_info() -> dict:
    """What the figures were measured on (load average included: a busy machine slows every timing)."""
    import platform

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_average_1m"] = None
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        info["memory_gib"] = None
    return info


def clean_json(obj):
    """Plain JSON types; NaN/inf become null (the storage writes strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return clean_json(obj.tolist())
    return obj


def batches_of(seqs: list[TokenWindow], size: int, pad_id: int) -> list[Batch]:
    return [collate(seqs[i : i + size], pad_id) for i in range(0, len(seqs), size)]


def new_gpt2(vocab_size: int, n_embd: int, n_layer: int, n_head: int, n_positions: int, seed: int,
             eos_id: int, pad_id: int, n_inner: int | None = None):
    """A GPT-2 from config (nothing downloaded), seeded without disturbing the global RNG."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def train_causal_lm(model, seqs: list[TokenWindow], pad_id: int, *, epochs: int, batch_size: int, lr: float,
                    seed: int, device: torch.device | str = "cpu") -> list[float]:
    """AdamW on the mean token NLL of ``seqs`` for ``epochs`` seeded shuffles; returns the loss per step.

    Linear warm-up over the first tenth of the steps, cosine decay to a tenth
    of ``lr``. The same seed, data and recipe give the same model.
    """
    model.to(device).train()
    model.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(seqs) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            batch = collate([seqs[i] for i in order[start : start + batch_size]], pad_id).to(device)
            targets = (batch.labels[:, 1:] != IGNORE).sum().clamp(min=1)
            loss = sequence_losses(model, batch).sum() / targets
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def completion_logprobs(model, queries: list[TokenWindow], pad_id: int, device="cpu") -> np.ndarray:
    """``f(q) = log p(completion | prompt)``, summed over completion tokens, per query."""
    model.eval()
    out = []
    for batch in batches_of(queries, 16, pad_id):
        out.append(-sequence_losses(model, batch.to(device)).double().cpu())
    return torch.cat(out).numpy()


# ---- EK-FAC settings from shared captures -------------------------------------------------


def _project(captured: dict[str, Captured], engine: InfluenceEngine) -> dict[str, Captured]:
    """Full-size captured vectors mapped into ``engine``'s projected space (``P_in a``, ``P_out g``)."""
    if engine.projector is None:
        return captured
    t_in, t_out = engine.projector.transforms()
    out = {}
    for name, c in captured.items():
        a = t_in[name](c.a) if t_in.get(name) is not None else c.a
        g = t_out[name](c.g) if t_out.get(name) is not None else c.g
        out[name] = Captured(a, g)
    return out


class SharedCaptureScorer:
    """Several EK-FAC settings of one model, scored from one forward/backward per batch and pass.

    ``settings`` maps a name to a ``ProjectionSpec`` (dim 0 = plain EK-FAC).
    Full-size vectors are captured once (sampled labels for the two fitting
    passes, data labels for scoring) and projected per setting, which is
    exactly what an engine with that projection would capture. Sketch-mode
    settings use the full-size factors; curvature-mode settings get factors
    fitted on their projected vectors. ``score`` also returns the identity-
    curvature baselines ``grad_dot`` and ``grad_cos`` from the same captures.
    """

    def __init__(self, model, base: InfluenceConfig, settings: dict[str, ProjectionSpec], device):
        self.base = base
        self.full = InfluenceEngine(model, replace(base, projection=ProjectionSpec(0)), device)
        self.engines = {name: InfluenceEngine(self.full.model, replace(base, projection=spec), device)
                        for name, spec in settings.items()}
        self.device = self.full.device
        self.factors: dict[str, EKFACFactors] = {}
        self.full_factors: EKFACFactors | None = None

    def _curvature(self) -> dict[str, InfluenceEngine]:
        return {n: e for n, e in self.engines.items() if e.config.factor_space == "projected"}

    def fit(self, batches: list[Batch]) -> None:
        """Both EK-FAC passes for the full space and every curvature-mode space."""
        label_mode = "data" if self.base.empirical_fisher else "sampled"
        curvature = self._curvature()
        cov = CovarianceSums.zeros(self.full.space_dims(False), self.device)
        cov_p = {n: CovarianceSums.zeros(e.space_dims(True), self.device) for n, e in curvature.items()}
        gen = torch.Generator(device=self.device).manual_seed(self.base.seed)
        for batch in batches:
            captured, _ = self.full.capture_batch(batch, False, label_mode, gen)
            mask = batch.attention_mask.to(self.device)
            cov.update(captured, mask)
            for n, e in curvature.items():
                cov_p[n].update(_project(captured, e), mask)
        bases = eigendecompose(cov)
        bases_p = {n: eigendecompose(c) for n, c in cov_p.items()}
        lam = LambdaSums.zeros(self.full.space_dims(False), self.device)
        lam_p = {n: LambdaSums.zeros(e.space_dims(True), self.device) for n, e in curvature.items()}
        gen = torch.Generator(device=self.device).manual_seed(self.base.seed + 1)
        for batch in batches:
            captured, _ = self.full.capture_batch(batch, False, label_mode, gen)
            count = batch.input_ids.shape[0]
            lam.update(captured, bases, count)
            for n, e in curvature.items():
                lam_p[n].update(_project(captured, e), bases_p[n], count)
        self.full_factors = EKFACFactors.from_parts(self.full.factors_meta(), bases, lam)
        for name, engine in self.engines.items():
            if name in curvature:
                self.factors[name] = EKFACFactors.from_parts(engine.factors_meta(), bases_p[name], lam_p[name])
            else:
                self.factors[name] = self.full_factors

    def query_gradients(self, batches: list[Batch], query_ids: list[str]) -> dict[str, QueryGradients]:
        """Preconditioned query gradients of every setting, plus ``ekfac`` (dim 0) and ``raw`` (identity)."""
        out = {"ekfac": self.full.query_gradients(batches, self.full_factors, query_ids)}
        for name, engine in self.engines.items():
            out[name] = engine.query_gradients(batches, self.factors[name], query_ids)
        out["raw"] = raw_query_gradients(self.full, batches, query_ids)
        return out

    def score(self, batches: list[Batch], queries: dict[str, QueryGradients]) -> dict[str, np.ndarray]:
        """``(N, Q)`` float64 scores per setting name, plus ``ekfac``, ``grad_dot`` and ``grad_cos``."""
        names = ["ekfac", *self.engines]
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in [*names, "grad_dot", "grad_cos"]}
        q_norm = query_gradient_norms(queries["raw"]).to(torch.float64).cpu()
        for batch in batches:
            captured, _ = self.full.capture_batch(batch, projected=False, label_mode="data")
            for name in names:
                cap = captured if name == "ekfac" else _project(captured, self.engines[name])
                q = queries[name]
                parts[name].append(sum(q.layer_scores(n, cap[n]) for n in self.full.layers).double().cpu())
            dot = sum(queries["raw"].layer_scores(n, captured[n]) for n in self.full.layers).double().cpu()
            norms = sequence_gradient_norms(captured).double().cpu()
            parts["grad_dot"].append(dot)
            parts["grad_cos"].append(dot / (norms[:, None] * q_norm[None, :]).clamp(min=1e-300))
        return {n: torch.cat(p).numpy() for n, p in parts.items()}


def projected_size(engine: InfluenceEngine) -> int:
    """Numbers per training gradient the setting stores and multiplies: ``sum over layers k_out * k_in``."""
    return int(sum(a * b for a, b in engine.space_dims(True).values()))


# ---- document-level aggregation and ranking metrics ---------------------------------------


def doc_scores(window_scores: np.ndarray, window_docs: list[str], doc_ids: list[str], how: str) -> np.ndarray:
    """``(num_docs, Q)`` from ``(num_windows, Q)``: ``sum`` (influence) or ``max`` (similarity) over windows."""
    index = {d: i for i, d in enumerate(doc_ids)}
    fill = 0.0 if how == "sum" else -np.inf
    out = np.full((len(doc_ids), window_scores.shape[1]), fill, dtype=np.float64)
    for row, doc in enumerate(window_docs):
        i = index[doc]
        out[i] = out[i] + window_scores[row] if how == "sum" else np.maximum(out[i], window_scores[row])
    out[~np.isfinite(out)] = -1e300  # documents without windows rank last
    return out


def chance_scores(shape: tuple[int, int], draws: int, seed: int):
    """``draws`` random score matrices (a random ranking per query each)."""
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        yield rng.standard_normal(shape)


def _method_table(methods: dict[str, np.ndarray], metric_fn, chance_shape, draws: int, seed: int) -> dict:
    """``metric_fn(scores) -> dict`` for every method, plus ``chance`` averaged over random draws."""
    out = {name: metric_fn(s) for name, s in methods.items()}
    runs = [metric_fn(s) for s in chance_scores(chance_shape, draws, seed)]
    out["chance"] = _average_dicts(runs)
    return out


def _average_dicts(runs: list[dict]):
    """Elementwise mean of nested dicts of numbers (None/NaN left out)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _average_dicts([r[k] for r in runs]) for k in first}
    if isinstance(first, int) and not isinstance(first, bool) and all(r == first for r in runs):
        return first  # counts (e.g. n_facts) are the same in every draw
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return metrics.nanmean([float(r) for r in runs if r is not None])
    return first


def _ranking_metrics(scores: np.ndarray, doc_ids: list[str], facts: list[dict], k: int) -> dict:
    """Mean strict recall, recall@k and MRR over ``facts`` (columns of ``scores`` in fact order), by copies."""
    rows = []
    for fact in facts:
        ranked = metrics.ranking(doc_ids, scores[:, fact["_column"]])
        gold = set(fact["gold_doc_ids"])
        rows.append((fact["copies"], metrics.strict_recall(ranked, gold), metrics.recall_at_k(ranked, gold, k),
                     metrics.mrr(ranked, gold)))

    def summary(subset):
        if not subset:
            return {"n_facts": 0, "strict_recall": None, f"recall_at_{k}": None, "mrr": None}
        return {
            "n_facts": len(subset),
            "strict_recall": float(np.mean([r[1] for r in subset])),
            f"recall_at_{k}": float(np.mean([r[2] for r in subset])),
            "mrr": float(np.mean([r[3] for r in subset])),
        }

    out = summary(rows)
    out["by_copies"] = {str(c): summary([r for r in rows if r[0] == c]) for c in sorted({r[0] for r in rows})}
    return out


def _agreement(scores: np.ndarray, reference: np.ndarray, k: int) -> dict:
    """Mean over queries of Spearman and top-k overlap (proponents) of ``(N, Q)`` against a reference."""
    q = scores.shape[1]
    rho = [metrics.spearman(scores[:, i], reference[:, i]) for i in range(q)]
    overlap = [metrics.topk_overlap(scores[:, i], reference[:, i], k) for i in range(q)]
    return {"spearman": metrics.nanmean(rho), "topk_overlap": float(np.mean(overlap)), "k": k,
            "spearman_min": float(np.nanmin(rho)) if not all(math.isnan(r) for r in rho) else None}


# ---- worlds -------------------------------------------------------------------------------


@dataclass
class DemoWorld:
    """The demo build: model, tokenizer, corpus rows and facts."""

    spec: Any
    artifacts: Any
    model: Any
    tokenizer: Any
    docs: list[dict]
    facts: list[dict]


def load_demo_world(cfg: EvaluateConfig) -> DemoWorld:
    from pipeline.demo import build_demo
    from pipeline.model_io import load_model_and_tokenizer

    spec = cfg.demo.spec()
    artifacts = build_demo(cfg.demo.cache_dir, spec)
    model, tokenizer = load_model_and_tokenizer(artifacts.model_dir)
    docs = pq.read_table(artifacts.corpus_path).to_pylist()
    with open(artifacts.facts_path) as f:
        facts = json.load(f)
    return DemoWorld(spec, artifacts, model, tokenizer, docs, facts)


def _window(cfg: EvaluateConfig, world: DemoWorld) -> int:
    return int(cfg.window) if cfg.window is not None else int(world.spec.window)


def _similarity_methods(model, tokenizer, train_seqs, query_seqs, device, batch_size) -> np.ndarray:
    """RepSim ``(N, Q)``."""
    pad = tokenizer.pad_token_id
    model = model.to(device)
    train_rep = representations(model, batches_of(train_seqs, batch_size, pad), device)
    query_rep = representations(model, batches_of(query_seqs, batch_size, pad), device)
    return cosine_matrix(train_rep, query_rep).numpy()


def facts_and_fidelity(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Planted-facts retrieval and projection fidelity on the demo model (one shared scoring pass)."""
    started = time.perf_counter()
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    window = _window(cfg, world)
    doc_ids = [d["id"] for d in world.docs]
    train_seqs, skipped = encode_documents(tok, [(d["id"], d["text"]) for d in world.docs], window)
    facts = [dict(f, _column=i) for i, f in enumerate(world.facts)]
    query_seqs = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], window) for f in facts]
    base = cfg.influence()
    default_spec = base.projection
    settings: dict[str, ProjectionSpec] = {}
    if default_spec.enabled:
        settings["ekfac_projected"] = default_spec
    if cfg.fidelity.enabled:
        for mode in cfg.fidelity.modes:
            for dim in cfg.fidelity.dims:
                settings[f"{mode}-{int(dim)}"] = ProjectionSpec(int(dim), default_spec.seed, mode)
    scorer = SharedCaptureScorer(world.model, base, settings, device)
    train_batches = batches_of(train_seqs, cfg.batch_size, pad)
    query_batches = batches_of(query_seqs, cfg.batch_size, pad)
    scorer.fit(train_batches)
    fitted = time.perf_counter()
    window_scores = scorer.score(train_batches, scorer.query_gradients(query_batches, [q.doc_id for q in query_seqs]))
    scored = time.perf_counter()
    if not default_spec.enabled:
        window_scores["ekfac_projected"] = window_scores["ekfac"]
    window_docs = [s.doc_id for s in train_seqs]
    result: dict[str, Any] = {
        "model": {"path": world.artifacts.model_dir, "spec": asdict(world.spec)},
        "n_docs": len(doc_ids), "n_windows": len(train_seqs), "window": window, "n_skipped_docs": len(skipped),
        "timings_s": {"fit": fitted - started, "score_all_settings": scored - fitted},
    }

    if cfg.facts.enabled:
        repsim = _similarity_methods(world.model, tok, train_seqs, query_seqs, device, cfg.batch_size)
        bm25 = BM25([d["text"] for d in world.docs])
        methods = {
            name: doc_scores(window_scores[name], window_docs, doc_ids, "sum")
            for name in ("ekfac", "ekfac_projected", "grad_dot")
        }
        methods["grad_cos"] = doc_scores(window_scores["grad_cos"], window_docs, doc_ids, "max")
        methods["repsim"] = doc_scores(repsim, window_docs, doc_ids, "max")
        methods["bm25"] = np.stack([bm25.scores(f["prompt"] + f["completion"]) for f in facts], 1)
        learned = [f for f in facts if f.get("learned")]
        k = cfg.facts.recall_k

        def metric_fn(scores):
            return {"learned": _ranking_metrics(scores, doc_ids, learned, k), "all": _ranking_metrics(scores, doc_ids, facts, k)}

        result["facts"] = {
            "n_facts": len(facts),
            "n_learned": len(learned),
            "learned_by_copies": {str(c): [sum(1 for f in facts if f["copies"] == c and f.get("learned")),
                                           sum(1 for f in facts if f["copies"] == c)]
                                  for c in sorted({f["copies"] for f in facts})},
            "recall_k": k,
            "projection": default_spec.to_json(),
            "methods": _method_table(methods, metric_fn, (len(doc_ids), len(facts)), cfg.chance_draws, cfg.seed),
            "note": "metrics under 'learned' are the headline (facts the model learned); 'all' includes the rest",
        }

    if cfg.fidelity.enabled:
        k = cfg.fidelity.top_k
        rows = []
        for mode in cfg.fidelity.modes:
            for dim in cfg.fidelity.dims:
                name = f"{mode}-{int(dim)}"
                row = {"mode": mode, "dim": int(dim), "projected_size": projected_size(scorer.engines[name])}
                row.update(_agreement(window_scores[name], window_scores["ekfac"], k))
                rows.append(row)
        result["fidelity"] = {
            "reference": "ekfac (projection off, same factors data and labels)",
            "full_size": projected_size(scorer.full),
            "n_windows": len(train_seqs), "n_queries": len(query_seqs),
            "settings": rows,
            "recommended": recommend_projection(rows, cfg.fidelity.target_spearman),
        }
    result["timings_s"]["total"] = time.perf_counter() - started
    return result


def recommend_projection(rows: list[dict], target: float) -> dict:
    """The mode that wins at most dims (by Spearman, ties by overlap), and its smallest dim reaching ``target``."""
    dims = sorted({r["dim"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    by = {(r["mode"], r["dim"]): r for r in rows}
    wins = {m: 0 for m in modes}
    for d in dims:
        present = [m for m in modes if (m, d) in by and by[(m, d)]["spearman"] is not None]
        if present:
            best = max(present, key=lambda m: (by[(m, d)]["spearman"], by[(m, d)]["topk_overlap"]))
            wins[best] += 1
    mode = max(modes, key=lambda m: (wins[m], metrics.nanmean([by[(m, d)]["spearman"] for d in dims if (m, d) in by])))
    reaching = [d for d in dims if (mode, d) in by and (by[(mode, d)]["spearman"] or -1) >= target]
    dim = reaching[0] if reaching else dims[-1]
    return {"mode": mode, "dim": dim, "wins_by_mode": wins, "target_spearman": target,
            "reached_target": bool(reaching), **{k: by[(mode, dim)][k] for k in ("spearman", "topk_overlap")}}


# ---- backdoor -----------------------------------------------------------------------------


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def backdoor_corpus(world: DemoWorld, cfg: BackdoorConfig, seed: int) -> tuple[list[dict], list[str], list[str]]:
    """Clean filler documents with the trigger + continuation inserted at a sentence boundary of a few.

    Returns the documents (``id``, ``text``, ``poisoned``), the poisoned ids,
    and held-out clean sentences for the queries' prompts.
    """
    rng = random.Random(seed)
    filler = [d for d in world.docs if not d.get("is_planted_for")]
    rng.shuffle(filler)
    if len(filler) < cfg.n_docs + 1:
        raise ValueError(
            f"backdoor.n_docs={cfg.n_docs} needs more filler documents than the demo has ({len(filler)}); "
            "lower backdoor.n_docs or raise demo.n_filler_docs"
        )
    chosen, held_out = filler[: cfg.n_docs], filler[cfg.n_docs :]
    n_poison = max(1, round(cfg.poison_fraction * cfg.n_docs))
    poisoned = set(rng.sample(range(cfg.n_docs), n_poison))
    payload = cfg.trigger + cfg.continuation
    docs = []
    for i, d in enumerate(chosen):
        text = d["text"]
        if i in poisoned:
            sentences = _SENTENCE_END.split(text)
            at = rng.randint(0, len(sentences))
            text = " ".join(sentences[:at] + [payload] + sentences[at:])
        docs.append({"id": f"bd-{i:05d}", "text": text, "poisoned": i in poisoned})
    prompts = []
    for d in held_out:
        for sentence in _SENTENCE_END.split(d["text"]):
            if 20 <= len(sentence) <= 120:
                prompts.append(sentence)
                break
        if len(prompts) == cfg.n_queries:
            break
    if len(prompts) < cfg.n_queries:
        raise ValueError(f"found {len(prompts)} held-out sentences for {cfg.n_queries} backdoor queries")
    return docs, sorted(d["id"] for d in docs if d["poisoned"]), prompts


def backdoor(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Recover the poisoned documents from triggered queries on a model trained on the poisoned corpus."""
    started = time.perf_counter()
    bc = cfg.backdoor
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    window = _window(cfg, world)
    docs, poisoned_ids, prompts = backdoor_corpus(world, bc, cfg.seed)
    train_seqs, _ = encode_documents(tok, [(d["id"], d["text"]) for d in docs], window)
    model = new_gpt2(len(tok), bc.n_embd, bc.n_layer, bc.n_head, window, cfg.seed, tok.eos_token_id, pad)
    losses = train_causal_lm(model, train_seqs, pad, epochs=bc.epochs, batch_size=bc.batch_size, lr=bc.lr,
                             seed=cfg.seed, device=device)
    trained = time.perf_counter()
    trigger = bc.trigger
    queries = [encode_query(tok, f"backdoor-{i}", p + " " + trigger, bc.continuation, window)
               for i, p in enumerate(prompts)]
    clean = [encode_query(tok, f"clean-{i}", p, bc.continuation, window) for i, p in enumerate(prompts)]
    with_trigger = completion_logprobs(model, queries, pad, device)
    without = completion_logprobs(model, clean, pad, device)

    base = cfg.influence()
    settings = {"ekfac_projected": base.projection} if base.projection.enabled else {}
    scorer = SharedCaptureScorer(model, base, settings, device)
    train_batches = batches_of(train_seqs, cfg.batch_size, pad)
    scorer.fit(train_batches)
    window_scores = scorer.score(
        train_batches, scorer.query_gradients(batches_of(queries, cfg.batch_size, pad), [q.doc_id for q in queries]))
    if not base.projection.enabled:
        window_scores["ekfac_projected"] = window_scores["ekfac"]
    doc_ids = [d["id"] for d in docs]
    window_docs = [s.doc_id for s in train_seqs]
    methods = {n: doc_scores(window_scores[n], window_docs, doc_ids, "sum") for n in ("ekfac", "ekfac_projected", "grad_dot")}
    methods["grad_cos"] = doc_scores(window_scores["grad_cos"], window_docs, doc_ids, "max")
    methods["repsim"] = doc_scores(_similarity_methods(model, tok, train_seqs, queries, device, cfg.batch_size),
                                   window_docs, doc_ids, "max")
    bm25 = BM25([d["text"] for d in docs])
    methods["bm25"] = np.stack([bm25.scores(p + " " + trigger + bc.continuation) for p in prompts], 1)
    labels = np.array([d["poisoned"] for d in docs])
    n_poison = len(poisoned_ids)
    gold = set(poisoned_ids)

    def metric_fn(scores):
        ap, p_n, p_k = [], [], []
        for q in range(scores.shape[1]):
            ranked = metrics.ranking(doc_ids, scores[:, q])
            ap.append(metrics.auprc(scores[:, q], labels))
            p_n.append(metrics.precision_at_k(ranked, gold, n_poison))
            p_k.append(metrics.precision_at_k(ranked, gold, bc.precision_k))
        return {"auprc": float(np.mean(ap)), "precision_at_n_poisoned": float(np.mean(p_n)),
                f"precision_at_{bc.precision_k}": float(np.mean(p_k))}

    return {
        "n_docs": len(docs), "n_windows": len(train_seqs), "n_poisoned": n_poison, "poisoned_ids": poisoned_ids,
        "trigger": trigger, "continuation": bc.continuation, "n_queries": len(queries),
        "model": {"n_embd": bc.n_embd, "n_layer": bc.n_layer, "epochs": bc.epochs,
                  "final_loss": float(np.mean(losses[-10:]))},
        "backdoor_logprob": {"with_trigger": float(with_trigger.mean()), "without_trigger": float(without.mean()),
                             "note": "summed log p(continuation | prompt), mean over queries"},
        "methods": _method_table(methods, metric_fn, (len(doc_ids), len(queries)), cfg.chance_draws, cfg.seed),
        "timings_s": {"train": trained - started, "total": time.perf_counter() - started},
    }


# ---- small world: exact oracle and LDS ----------------------------------------------------


def small_world_data(world: DemoWorld, cfg: SmallWorldConfig, seed: int) -> tuple[list[TokenWindow], list[TokenWindow]]:
    """Training windows (planted documents of the first facts, then filler) and queries (facts, held-out)."""
    tok = world.tokenizer
    facts = world.facts[: cfg.n_facts]
    planted = [d for f in facts for d in world.docs if d["id"] in set(f["gold_doc_ids"])]
    filler = [d for d in world.docs if not d.get("is_planted_for")]
    random.Random(seed).shuffle(filler)
    train: list[TokenWindow] = []
    next_filler = 0  # filler documents from here on were not used for training
    for i, doc in enumerate(planted + filler):
        if len(train) >= cfg.n_train:
            break
        seqs, _ = encode_documents(tok, [(doc["id"], doc["text"])], cfg.window)
        train.extend(seqs[: cfg.n_train - len(train)])
        next_filler = max(0, i + 1 - len(planted))
    queries = [encode_query(tok, f["fact_id"], f["prompt"], f["completion"], cfg.window) for f in facts]
    held_out = filler[next_filler:]
    for doc in held_out:
        if len(queries) >= len(facts) + cfg.n_heldout_queries:
            break
        seqs, _ = encode_documents(tok, [(doc["id"], doc["text"])], cfg.window)
        if not seqs or len(seqs[0].input_ids) < cfg.completion_tokens + 2:
            continue
        ids = seqs[0].input_ids
        labels = (IGNORE,) * (len(ids) - cfg.completion_tokens) + ids[-cfg.completion_tokens :]
        queries.append(TokenWindow(f"heldout-{doc['id']}", 0, ids, labels))
    if len(train) < cfg.n_train:
        raise ValueError(f"the demo corpus gives only {len(train)} windows for small.n_train={cfg.n_train}")
    return train, queries


def small_world(cfg: EvaluateConfig, world: DemoWorld, device: torch.device) -> dict:
    """Exact oracle, kronfluence and LDS on a GPT-2 small enough for a dense Fisher."""
    started = time.perf_counter()
    sc = cfg.small
    tok, pad = world.tokenizer, world.tokenizer.pad_token_id
    train, queries = small_world_data(world, sc, cfg.seed)
    query_ids = [q.doc_id for q in queries]

    def fresh_model():
        return new_gpt2(len(tok), sc.n_embd, sc.n_layer, sc.n_head, sc.window, cfg.seed, tok.eos_token_id, pad,
                        n_inner=sc.n_inner)

    def trained_model(subset: list[TokenWindow], seed: int):
        model = fresh_model()
        train_causal_lm(model, subset, pad, epochs=sc.epochs, batch_size=sc.batch_size, lr=sc.lr, seed=seed,
                        device=device)
        return model

    model = trained_model(train, cfg.seed).to(torch.float64)
    trained = time.perf_counter()
    # float64 throughout: differences below are approximation error, not rounding.
    base = replace(cfg.influence(), precision="float64")
    settings = {"ekfac_projected": base.projection} if base.projection.enabled else {}
    scorer = SharedCaptureScorer(model, base, settings, device)
    train_batches = batches_of(train, cfg.batch_size, pad)
    query_batches = batches_of(queries, cfg.batch_size, pad)
    scorer.fit(train_batches)
    scores = scorer.score(train_batches, scorer.query_gradients(query_batches, query_ids))
    if not base.projection.enabled:
        scores["ekfac_projected"] = scores["ekfac"]
    emp = SharedCaptureScorer(model, replace(base, empirical_fisher=True), {}, device)
    emp.fit(train_batches)
    scores["ekfac_empirical"] = emp.score(train_batches, emp.query_gradients(query_batches, query_ids))["ekfac"]
    scores["repsim"] = _similarity_methods(model, tok, train, queries, device, cfg.batch_size)
    bm25 = BM25([tok.decode(list(s.input_ids)) for s in train])
    scores["bm25"] = np.stack([bm25.scores(tok.decode(list(q.input_ids))) for q in queries], 1)
    layers = scorer.full.layers
    n_params = sum(s.d_out * s.d_in for s in layers.values())
    result: dict[str, Any] = {
        "n_train": len(train), "n_queries": len(queries), "query_ids": query_ids, "window": sc.window,
        "model": {"n_embd": sc.n_embd, "n_layer": sc.n_layer, "n_inner": sc.n_inner, "tracked_params": n_params},
        "fisher": "empirical" if base.empirical_fisher else "sampled", "damping": base.damping,
    }

    kron_reason = ""
    if cfg.kronfluence:
        ok, kron_reason = kronfluence_available()
        if ok:
            try:
                kron, timing = kronfluence_pairwise(
                    model, list(layers), train, queries, pad, damping=base.damping,
                    empirical_fisher=base.empirical_fisher, precision="float64", device=str(device),
                    train_batch_size=cfg.batch_size, query_batch_size=cfg.batch_size, seed=cfg.seed)
                scores["kronfluence"] = kron.T.numpy()
                ref = scores["kronfluence"]
                rel = float(np.linalg.norm(scores["ekfac"] - ref) / max(np.linalg.norm(ref), 1e-300))
                result["kronfluence"] = {
                    "available": True, **_agreement(scores["ekfac"], ref, sc.top_k), "relative_error": rel,
                    "seconds": timing,
                    "note": "ours (projection off) vs kronfluence, same fisher kind and damping; with the sampled "
                            "Fisher each side draws its own labels, so only rankings can agree exactly",
                }
            except KronfluenceUnavailable as exc:
                kron_reason = str(exc)
    else:
        kron_reason = "disabled by config (kronfluence=false)"
    if "kronfluence" not in result:
        result["kronfluence"] = {"available": False, "reason": kron_reason}

    if sc.oracle:
        if n_params > sc.max_params:
            result["oracle"] = {"skipped": f"{n_params} tracked params > small.max_params={sc.max_params}"}
        else:
            oracle = exact_influence(model, layers, train, queries, pad, damping=base.damping,
                                     max_params=sc.max_params).T.numpy()
            scores["oracle"] = oracle
            methods = {n: s for n, s in scores.items() if n != "oracle"}
            result["oracle"] = {
                "definition": "g_q^T (F + lambda)^-1 g_n, F = dense empirical Fisher of the tracked layers "
                              "(autograd per-sequence gradients), lambda = 0.1 * mean diag per layer",
                "methods": _method_table(methods, lambda s: _agreement(s, oracle, sc.top_k),
                                         oracle.shape, cfg.chance_draws, cfg.seed),
            }
    result["timings_s"] = {"train": trained - started, "attribute": time.perf_counter() - trained}

    if sc.lds:
        lds_started = time.perf_counter()
        rng = np.random.default_rng(cfg.seed + 12345)
        n, m = len(train), sc.lds_subsets
        size = max(1, round(sc.lds_fraction * n))
        masks = np.zeros((m, n))
        for j in range(m):
            masks[j, rng.choice(n, size, replace=False)] = 1
        measured = np.zeros((len(queries), m))
        measured_2 = np.zeros((len(queries), m)) if sc.lds_ceiling else None
        for j in range(m):
            subset = [train[i] for i in np.flatnonzero(masks[j])]
            measured[:, j] = completion_logprobs(trained_model(subset, cfg.seed), queries, pad, device)
            if measured_2 is not None:
                measured_2[:, j] = completion_logprobs(trained_model(subset, cfg.seed + 1), queries, pad, device)
            log.info("lds: retrained subset %d/%d", j + 1, m)
        per_method = {name: metrics.lds(s.T, masks, measured) for name, s in scores.items()}
        per_method["chance"] = metrics.nanmean(
            [metrics.lds(s.T, masks, measured) for s in chance_scores((n, len(queries)), cfg.chance_draws, cfg.seed)])
        ceiling = None
        if measured_2 is not None:
            ceiling = metrics.nanmean([metrics.spearman(measured[q], measured_2[q]) for q in range(len(queries))])
        fact_rows = [i for i, q in enumerate(query_ids) if not q.startswith("heldout-")]
        held_rows = [i for i, q in enumerate(query_ids) if q.startswith("heldout-")]
        by_kind = {}
        for kind, rows in (("fact", fact_rows), ("heldout", held_rows)):
            if rows:
                by_kind[kind] = {name: metrics.lds(s.T[rows], masks, measured[rows]) for name, s in scores.items()}
        result["lds"] = {
            "definition": "per query, Spearman across subsets of sum_{i in S} score(q, i) vs log p(completion) "
                          "of the model retrained on S (same init and recipe); mean over queries",
            "subsets": m, "fraction": sc.lds_fraction, "epochs": sc.epochs,
            "methods": per_method,
            "by_query_kind": by_kind,
            "seed_to_seed_ceiling": ceiling,
            "measured_logprob_mean": float(measured.mean()),
            "measured_logprob_std_across_subsets": float(measured.std(axis=1).mean()),
            "seconds": time.perf_counter() - lds_started,
        }
    result["timings_s"]["total"] = time.perf_counter() - started
    return result


# ---- the job ------------------------------------------------------------------------------


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Every enabled section; writes ``{storage.root}/evaluations/{cfg.name}.json`` and returns it."""
    cfg.validate()
    with torch_threads(cfg.threads):
        return _run_evaluation(cfg)


def _run_evaluation(cfg: EvaluateConfig) -> dict:
    from pipeline import layout
    from pipeline.storage import Storage

    storage = Storage(cfg.storage.root, cfg.storage.options)
    storage.check_writable()
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    log.info("evaluation %r on %s", cfg.name, device)
    world = load_demo_world(cfg)
    n_filler = sum(1 for d in world.docs if not d.get("is_planted_for"))
    if cfg.backdoor.enabled and n_filler < cfg.backdoor.n_docs + cfg.backdoor.n_queries:
        raise ValueError(
            f"backdoor.n_docs={cfg.backdoor.n_docs} plus {cfg.backdoor.n_queries} held-out documents need more "
            f"filler documents than the demo has ({n_filler}); lower backdoor.n_docs or raise demo.n_filler_docs"
        )
    result: dict[str, Any] = {
        "name": cfg.name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "device": str(device),
        "config": asdict(cfg),
        "ekfac": {**{k: v for k, v in asdict(cfg.influence()).items() if k != "projection"},
                  "projection": cfg.projection_spec().to_json()},
        "demo": {"model_dir": world.artifacts.model_dir, "spec": asdict(world.spec),
                 "n_docs": len(world.docs), "n_facts": len(world.facts)},
        "timings_s": {"demo": time.perf_counter() - started},
    }
    result["config"]["storage"]["options"] = sorted(cfg.storage.options)
    if cfg.facts.enabled or cfg.fidelity.enabled:
        log.info("facts/fidelity: scoring the demo model")
        section = facts_and_fidelity(cfg, world, device)
        for key in ("facts", "fidelity"):
            if key in section:
                result[key] = section.pop(key)
        result["facts_world"] = section
    if cfg.backdoor.enabled:
        log.info("backdoor: training a model on the poisoned corpus")
        result["backdoor"] = backdoor(cfg, world, device)
    if cfg.small.oracle or cfg.small.lds:
        log.info("small world: oracle, kronfluence, LDS")
        result["small_world"] = small_world(cfg, world, device)
    result["timings_s"]["total"] = time.perf_counter() - started
    result = clean_json(result)
    url = layout.evaluation_result(storage.root, cfg.name)
    storage.write_json(url, result)
    log.info("evaluation written to %s (%.1f s)", url, result["timings_s"]["total"])
    result["url"] = url
    return result


# ---- the printed report -------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """Plain-text tables of every section present in ``result``."""
    out = [f"evaluation {result['name']} ({result['device']}, {result['machine']['cpu_count']} CPUs, "
           f"load {result['machine'].get('load_average_1m')}), EK-FAC {result['ekfac']}"]
    facts = result.get("facts")
    if facts:
        k = facts["recall_k"]
        out.append(f"\nPlanted facts: {facts['n_learned']}/{facts['n_facts']} learned "
                   f"(learned/total by copies: {facts['learned_by_copies']}); metrics over learned facts")
        rows = []
        for name, m in facts["methods"].items():
            lm = m["learned"]
            rows.append([name, lm["strict_recall"], lm[f"recall_at_{k}"], lm["mrr"], m["all"]["mrr"]])
        out.append(_table(["method", "strict_recall", f"recall@{k}", "mrr", "mrr(all facts)"], rows))
        copies = sorted({c for m in facts["methods"].values() for c in m["learned"]["by_copies"]}, key=int)
        if copies:
            rows = [[name] + [m["learned"]["by_copies"].get(c, {}).get("mrr") for c in copies]
                    for name, m in facts["methods"].items()]
            out.append("MRR of learned facts by copies:")
            out.append(_table(["method"] + [f"{c} copies" for c in copies], rows))
    bd = result.get("backdoor")
    if bd:
        pk = [k for k in next(iter(bd["methods"].values())) if k.startswith("precision_at_") and k != "precision_at_n_poisoned"]
        out.append(f"\nBackdoor: {bd['n_poisoned']}/{bd['n_docs']} documents poisoned; log p(continuation) "
                   f"{bd['backdoor_logprob']['with_trigger']:.2f} with trigger vs "
                   f"{bd['backdoor_logprob']['without_trigger']:.2f} without")
        out.append(_table(["method", "auprc", "precision@n_poisoned"] + [p.replace("_at_", "@") for p in pk],
                          [[n, m["auprc"], m["precision_at_n_poisoned"]] + [m[p] for p in pk]
                           for n, m in bd["methods"].items()]))
    fid = result.get("fidelity")
    if fid:
        out.append(f"\nProjection fidelity vs unprojected EK-FAC ({fid['n_windows']} windows x {fid['n_queries']} "
                   f"queries; full size {fid['full_size']} numbers per gradient)")
        out.append(_table(["mode", "dim", "size", "spearman", "spearman_min", "topk_overlap"],
                          [[r["mode"], r["dim"], r["projected_size"], r["spearman"], r["spearman_min"],
                            r["topk_overlap"]] for r in fid["settings"]]))
        rec = fid["recommended"]
        out.append(f"recommended: mode={rec['mode']} dim={rec['dim']} (spearman {_fmt(rec['spearman'])}, "
                   f"top-k overlap {_fmt(rec['topk_overlap'])})")
    sw = result.get("small_world")
    if sw:
        out.append(f"\nSmall world: {sw['n_train']} windows, {sw['n_queries']} queries, "
                   f"{sw['model']['tracked_params']} tracked params")
        kr = sw.get("kronfluence", {})
        if kr.get("available"):
            out.append(f"ours vs kronfluence: spearman {_fmt(kr['spearman'])}, top-k overlap "
                       f"{_fmt(kr['topk_overlap'])}, relative error {kr['relative_error']:.2e}")
        else:
            out.append(f"kronfluence: not compared ({kr.get('reason')})")
        oracle = sw.get("oracle", {}).get("methods", {})
        lds = sw.get("lds", {})
        names = list(dict.fromkeys(list(oracle) + list(lds.get("methods", {}))))
        rows = [[n, oracle.get(n, {}).get("spearman"), oracle.get(n, {}).get("topk_overlap"),
                 lds.get("methods", {}).get(n)] for n in names]
        out.append(_table(["method", "spearman_vs_oracle", "topk_vs_oracle", "lds"], rows))
        if lds:
            out.append(f"LDS over {lds['subsets']} subsets of {lds['fraction']:.0%}; seed-to-seed ceiling "
                       f"{_fmt(lds['seed_to_seed_ceiling'])}")
    out.append(f"\ntotal {result['timings_s']['total']:.1f} s; written to {result.get('url', '-')}")
    return "\n".join(out)
