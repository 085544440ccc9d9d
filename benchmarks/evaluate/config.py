"""``EvaluateConfig``: the schema of ``jobs/evaluate.py`` and every default of its published run.

``conf/evaluate.yaml`` composes this schema and says only what differs; the
defaults here are the settings docs/figures.md was measured with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from benchmarks.common import DemoWorldConfig
from pipeline.config import AttributeConfig, StorageConfig, store_schema, to_typed
from pipeline.core.influence import InfluenceConfig
from pipeline.core.projection import MODES, ProjectionSpec
from pipeline.core.tracking import DEFAULT_MODULES
from pipeline.errors import ConfigError


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
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dims: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
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
    lds_subsets: int = 32
    lds_fraction: float = 0.5
    # Retrain every subset a second time with another seed: the seed-to-seed ceiling.
    lds_ceiling: bool = True
    top_k: int = 10


@dataclass
class Smollm2Config:
    """The real-model evaluation (``world=smollm2``): SmolLM2-135M fine-tuned on planted facts."""

    # Where benchmarks.smollm2_facts caches its build (and the base model); reused when present.
    cache_dir: str = "outputs/pretrained-cache"
    # Settings swept against exact EK-FAC (projection off, dense queries).
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dims: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    # Projection off with queries compressed to these ranks per layer (score.query_rank).
    query_ranks: list[int] = field(default_factory=lambda: [8, 32, 64])
    # k of the top-k overlap with exact EK-FAC.
    top_k: int = 10
    # The rule: the fastest setting whose mean top-k overlap with exact EK-FAC reaches this.
    min_topk_overlap: float = 0.95
    # Keep at most this many documents, planted ones first (0: all 128).
    max_docs: int = 0
    # Agreement is measured over every window; cost (fit, preconditioning, score, ceiling) on the first
    # cost_batches batches (0: all), each setting fitted and timed on its own.
    cost_batches: int = 4


WORLDS = ("demo", "smollm2")


def _evaluation_demo() -> DemoWorldConfig:
    # A smaller demo than the main job's: the evaluation's figures were measured on this one.
    return DemoWorldConfig(n_filler_docs=300, train_steps=600)


@dataclass
class EvaluateConfig:
    # The result is written to {storage.root}/evaluations/{name}.json.
    name: str = "default"
    storage: StorageConfig = field(default_factory=StorageConfig)
    # demo: the tiny GPT-2 worlds (facts, backdoor, fidelity, small world);
    # smollm2: SmolLM2-135M fine-tuned on planted facts (fidelity and cost sweep, facts; section smollm2).
    world: str = "demo"
    seed: int = 0
    # auto: cuda if available, else cpu.
    device: str = "auto"
    # Windows per forward/backward when fitting and scoring.
    batch_size: int = 8
    # Tokens per training window of the facts and backdoor worlds (null: the demo's window).
    window: Optional[int] = None
    # EK-FAC settings; null takes the attribution job's default (pipeline.config.AttributeConfig).
    damping: Optional[float] = None
    empirical_fisher: Optional[bool] = None
    projection_dim: Optional[int] = None
    projection_mode: Optional[str] = None
    modules: str = DEFAULT_MODULES
    # torch intra-op threads for the job (0: leave torch's default). On a busy machine with few cores,
    # 1 thread avoids oversubscription, which slowed small ops by 10x on the 2-core build machine.
    threads: int = 0
    # Random rankings averaged for the chance level.
    chance_draws: int = 200
    # Compare against kronfluence when it is installed (test-only dependency).
    kronfluence: bool = True
    demo: DemoWorldConfig = field(default_factory=_evaluation_demo)
    facts: FactsConfig = field(default_factory=FactsConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    small: SmallWorldConfig = field(default_factory=SmallWorldConfig)
    smollm2: Smollm2Config = field(default_factory=Smollm2Config)

    def validate(self) -> None:
        from pipeline.layout import validate_name

        validate_name(self.name, "name")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.projection_mode is not None and self.projection_mode not in MODES:
            raise ConfigError(f"projection_mode must be one of {MODES} or null, got {self.projection_mode!r}")
        if self.world not in WORLDS:
            raise ConfigError(f"world must be one of {WORLDS}, got {self.world!r}")
        bad_modes = [m for m in [*self.fidelity.modes, *self.smollm2.modes] if m not in MODES]
        if bad_modes:
            raise ConfigError(f"fidelity.modes / smollm2.modes {bad_modes} are not among {MODES}")
        if any(int(d) < 1 for d in self.smollm2.dims) or any(int(r) < 1 for r in self.smollm2.query_ranks):
            raise ConfigError(f"smollm2.dims and smollm2.query_ranks must be >= 1 (0 is the reference), got "
                              f"{self.smollm2.dims} and {self.smollm2.query_ranks}")
        if any(int(d) < 1 for d in self.fidelity.dims):
            raise ConfigError(f"fidelity.dims must be >= 1 (dim 0 is the reference), got {self.fidelity.dims}")
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.chance_draws >= 1, f"chance_draws must be >= 1, got {self.chance_draws}"),
            (self.smollm2.top_k >= 1, f"smollm2.top_k must be >= 1, got {self.smollm2.top_k}"),
            (0 < self.smollm2.min_topk_overlap <= 1,
             f"smollm2.min_topk_overlap must be in (0, 1], got {self.smollm2.min_topk_overlap}"),
            (self.smollm2.cost_batches >= 0, f"smollm2.cost_batches must be >= 0 (0: all), got "
                                              f"{self.smollm2.cost_batches}"),
            (self.smollm2.max_docs >= 0, f"smollm2.max_docs must be >= 0 (0: all), got {self.smollm2.max_docs}"),
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
                raise ConfigError(message)

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
