"""Typed configuration of the attribution jobs.

One dataclass per config group, holding every key's default: the YAML in
``conf/`` exists only for groups with alternatives (model, storage, cluster,
projection) and states only what an option changes. Hydra composes it against
these schemas (registered in the ConfigStore by ``register_configs``) and the
jobs convert the result with ``to_config``. ``AttributeConfig.validate`` runs
on the driver before any cluster time is spent. The contract keys
(README, Configuration: ``model.path``, ``corpus.path``, ``queries.path``,
``storage.root``, ``run.id``, ``score.top_k``, ``projection.dim``,
``factors.damping``, ``factors.empirical_fisher``, ``cluster.address``) keep
their names and meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.core.ekfac import EIGH_DTYPES
from pipeline.core.influence import PRECISIONS, PRODUCT_DTYPES, SCORE_PRODUCT_DTYPES, InfluenceConfig
from pipeline.core.projection import MODES, ProjectionSpec
from pipeline.core.tracking import DEFAULT_MODULES
from pipeline.errors import ConfigError

# The driver's stages, in the order they run (``run.stages`` picks a subset).
STAGES = ("fit", "precondition", "score", "merge")

# What ``corpus.on_bad_text`` may ask for a null or non-string text.
BAD_TEXT_ACTIONS = ("skip", "error")


@dataclass
class ModelConfig:
    # Hugging Face model directory, local or on object storage (s3://...). Empty: the demo model.
    path: str = ""
    # Regular expression (full match) over module names: the tracked Linear/Conv1D layers.
    modules: str = DEFAULT_MODULES
    # float32 (default), float64 (references) or bf16 (autocast, CUDA only).
    precision: str = "float32"
    # Scan the weights for NaN/inf on the driver before any worker starts (local model folders; about a second
    # per 100M parameters). The safetensors headers are always checked.
    check_weights: bool = True
    # Never executes code from the model folder unless explicitly enabled.
    trust_remote_code: bool = False
    # Where workers cache a model downloaded from object storage (per node).
    cache_dir: str = "/tmp/attribution-model-cache"


@dataclass
class CorpusConfig:
    # Parquet or JSONL: a file, a folder or a glob, local or s3://. Empty: the demo corpus.
    path: str = ""
    id_column: str = "id"
    text_column: str = "text"
    # Tokens per training window; longer documents become several windows overlapping by one token.
    # null: the model's context (max_position_embeddings or n_positions), at most 2048. The demo uses 64.
    window: int | None = None
    # A BOS token at the start of every document and query prompt. null: where the tokenizer adds one for its
    # own model (Llama's do, GPT-2's does not).
    add_bos: bool | None = None
    # An EOS token at the end of every document (pre-training concatenation). null: when the tokenizer has one.
    add_eos: bool | None = None
    # A null or non-string text: skip (the document is counted per file, logged and reported in the
    # manifest) or error (the run stops on the driver, naming the file).
    on_bad_text: str = "skip"
    # Documents per shard (shards are file + row range, deterministic across reruns).
    docs_per_shard: int = 128
    # Check that document ids are unique across the corpus on the driver before scoring.
    check_unique_ids: bool = True


@dataclass
class QueriesConfig:
    # JSONL or Parquet with id, prompt, completion. Empty: the demo queries.
    path: str = ""


@dataclass
class StorageConfig:
    # Root URL of all outputs: a local folder, file://... or s3://bucket/prefix.
    root: str = "outputs/attribution"
    # Extra fsspec storage options (e.g. {"endpoint_url": ...}). Credentials: the AWS env vars or a credentials
    # file (AWS_SHARED_CREDENTIALS_FILE); a secret given here is on the command line (Hydra saves no copy).
    options: dict = field(default_factory=dict)
    # Seconds an s3 connect or read may wait before it fails and is retried (storage.retries times, with backoff).
    timeout_s: float = 60.0
    retries: int = 3

    def open(self):
        """The `pipeline.storage.Storage` at ``root``, with these options, timeout and retries."""
        from pipeline.storage import Storage

        return Storage(self.root, self.options, timeout_s=self.timeout_s, retries=self.retries)


@dataclass
class RunConfig:
    # The run's name; outputs go to {storage.root}/runs/{run.id}. Letters, digits, '.', '_', '-'.
    id: str = "demo"
    # Recompute and replace committed units of this run instead of skipping them.
    overwrite: bool = False
    # Global seed (sampled Fisher labels, demo).
    seed: int = 0
    # The stages to run, a subset of fit, precondition, score, merge; they run in that order whatever the
    # order given. Each needs the previous ones committed (merge refuses while a shard is uncommitted).
    stages: list[str] = field(default_factory=lambda: list(STAGES))


@dataclass
class FactorsConfig:
    # Fixed damping (>= 0), or null for 0.1 * mean(Lambda) per layer.
    damping: float | None = None
    # true: fit with the data's own labels; false: labels sampled from the model (true Fisher).
    empirical_fisher: bool = False
    # Shards used to fit the factors (both passes), chosen by hash of shard id so the sample is stable as the
    # corpus grows (nightly refits reuse it); 0 = all shards.
    sample_shards: int = 0
    # At most this many documents fit the factors (both passes): the fewest shards, in that hash order, that
    # hold the count (whole shards); with sample_shards > 0 the smaller of the two samples; 0: no cap. The
    # default is kronfluence's (covariance_max_examples = lambda_max_examples = 100,000, its first examples):
    # it changes nothing on a corpus of fewer documents (every corpus measured in docs/figures.md), and on a
    # larger one bounds the fit as the oracle does, so the fit costs two bounded passes however large the
    # corpus; its fidelity there is kronfluence's default's, not measured by us. Enters the factors id (through
    # its shards) and the pin's settings id only when it drops shards, so pins made before it existed keep
    # their ids until the corpus grows past the cap.
    max_documents: int = 100_000
    batch_size: int = 8
    # A fit unit -- one task, and one set of partial sums others read and add (the A/S sums, one file per layer
    # group, by the workers eigendecomposing the groups; the Lambda sums by the driver): A/S 0.97 GB, Lambda
    # 0.32 GB for SmolLM2-135M's 90 MLP layers in float32 -- covers consecutive fitting shards holding about this
    # many documents, but the shards are split into no fewer units than there are workers (nor more than there
    # are shards). 0: one unit per shard, as before 2026-12-06: at the default cap, 782 shards of 128
    # documents wrote 782 such files per pass (760 GB of A/S sums for SmolLM2). On SmolLM2 in 16 shards on 2
    # workers the fit took 179-181 s in 2 units against 277-278 s in 16, writing 2.6 GB instead of 20.6 GB
    # (docs/figures.md, "Fit units"). Each shard keeps its own sampled labels, so the sums are the same, added in
    # another order: the factors differ only by rounding (which still moves low-rank scores by up to about 1e-3
    # of a score), also between numbers of workers; it does not enter the factors id. A unit that fails is
    # redone whole: larger units lose more work to a failure and take longer between progress updates (a unit of
    # k shards may run k times cluster.stall_timeout_s, so a hung unit is also found later).
    docs_per_unit: int = 2048
    # Fraction (0, 1] of the fitting shards (evenly spread) whose windows fit the eigenvalue correction
    # (Lambda pass), as kronfluence's lambda_max_examples; 1.0 = all. Enters the factors id when < 1.
    # On SmolLM2-135M with 96 windows 0.5 / 0.25 kept 0.956 / 0.950 of exact EK-FAC's top 10 (all: 0.969) at
    # 1.5 / 1.25 capture passes instead of 2; with 48 windows, Lambda on 24 or 16 of them moved a tenth of the
    # top 10: what counts is the number of windows fitting Lambda (docs/figures.md, "Fitting on a sample").
    lambda_sample: float = 1.0
    # At most this many documents (whole fitting shards, evenly spread, as few as reach the count) fit Lambda,
    # as kronfluence's lambda_max_examples: on a corpus of millions of documents the eigenvalue correction then
    # costs a bounded pass instead of a second full one. 0: no cap (the default). With lambda_sample < 1 the
    # smaller of the two subsets is used. Enters the factors id (through its Lambda shards) when it drops shards.
    lambda_max_documents: int = 0
    # float32 or bfloat16: the dtype of the fit's per-token products (the covariances a a^T and g g^T, and
    # Lambda's rotation into the eigenbasis; on CPU their outputs are bfloat16 too), each shard's sums
    # accumulated in float32 and the shards' added in float64. As score.product_dtype:
    # workers without fast bfloat16 multiply in float32. Enters the factors id when not float32. On
    # SmolLM2-135M bfloat16 cut the two capture passes from 2.93 to 2.33 ceiling passes and kept the float32
    # fit's top 10 (overlap 1.000; 0.975 with exact EK-FAC either way) (docs/figures.md, "Products in bfloat16").
    product_dtype: str = "bfloat16"
    # float32 or float64: the dtype the workers eigendecompose A and S in (their sums are added in float64
    # either way; float64 whenever model.precision=float64). Lambda is fitted in whatever orthonormal basis it
    # is given, so float32's rounding only moves the basis slightly off the eigenvectors. On SmolLM2-135M (90
    # MLP layers) float32 took 15.0 s against 31.3 s, kept 0.994 of the float64 bases' top 10, and the default
    # setting 0.956 of exact EK-FAC's (0.962 with float64 bases) (docs/figures.md, "Eigendecompositions in
    # float32"). float32 bases make scores depend on the order the fit's sums were added in (sharding) by up to
    # about 2e-4 of a query's largest score (the demo, pipeline against one process; within 1e-4 with float64).
    # Enters the factors id when not float64.
    eigh_dtype: str = "float32"
    # Factors are pinned per model, tracked layers, Fisher, space, window and tokenisation, and reused as the
    # corpus grows (docs/design.md#nightly-runs). true: refit on the current sample.
    refit: bool = False
    # Refit when the pinned factors were fitted on less than this share (0-1) of the corpus's documents.
    # 0: never refit for growth.
    refit_below_share: float = 0.0


@dataclass
class ProjectionConfig:
    # k for both Kronecker sides of every tracked layer; 0 = no projection (plain EK-FAC, the default).
    # Chosen on SmolLM2-135M (docs/figures.md, "Real model"): no projected setting keeps 0.95 of exact
    # EK-FAC's top 10 (curvature at 256 keeps 0.79, sketch at 256 0.58), so the rule picks projection off.
    dim: int = 0
    # With dim > 0 -- curvature: EK-FAC on projected vectors (LoGra); sketch: full-size EK-FAC, project the
    # preconditioned query. curvature agrees better with unprojected EK-FAC at every dim measured.
    mode: str = "curvature"
    seed: int = 0


@dataclass
class ScoreConfig:
    # Results kept per query and polarity (proponents and opponents).
    top_k: int = 10
    batch_size: int = 8
    # 0: dense preconditioned query gradients; r > 0: rank-r per layer (the paper's recipe). 24: the lowest
    # rank keeping >= 0.95 of exact EK-FAC's top 10 on all three SmolLM2-135M data sets measured (rank 8 kept
    # 0.950 and 0.963 of the first two, rank 16 0.988 of the second; on the third, rank 16 / 24 / 32 kept
    # 0.938 / 0.962 / 0.975 and scored at 1.09x / 1.10x / 1.03x the ceiling side by side -- a ceiling measured
    # 15-20% slower than the speed benchmark's, since fixed: docs/figures.md "Speed on SmolLM2"), at 1/17 of dense
    # queries' memory in float32, 1/35 with the factors kept in bfloat16 (product_dtype) (docs/figures.md,
    # "Real model" and "Rank on the benchmark's data").
    query_rank: int = 24
    # auto, float32, bfloat16 or int8: the dtype of the two large per-token products per layer with which
    # low-rank queries score a window (their inputs rounded to bfloat16 or quantised to int8 with a scale per token
    # and per query column; the results multiplied and summed in float32). On SmolLM2-135M, 100 rank-24/32
    # queries (docs/figures.md, "Products in bfloat16" and "Products in int8"): bfloat16 on matrix units (AMX on
    # recent Xeons, GPU tensor cores) scored at 0.85-1.10x the ceiling against float32's 0.65x, with the same
    # top-10 overlap with exact EK-FAC; int8 on a CPU with VNNI but no AMX at 1.01x against float32's 0.73x,
    # keeping 0.956 of the top 10 against float32's 0.962 (0.988 for both on the planted facts; scores within
    # 2.2e-4 of the largest). auto (the default) is the fastest of these the worker has: bfloat16 where it is
    # fast, else int8 where that is, else float32 (logged; each shard's commit records what it used, the
    # manifest the set). bfloat16 or int8 asked of a worker without them multiplies in float32. int8 was
    # measured on a 135M model only: models with large activation outliers may lose more to its per-token
    # scales. Also sets the preconditioning range finder's power iterations (bfloat16 where fast: 1.5x faster,
    # the approximation error unchanged to 3 digits, docs/figures.md "Range finder in bfloat16") and the dtype
    # low-rank query factors are kept and stored in (bfloat16 whenever the products are not float32: half the
    # query file, its join and every worker's read and copy).
    product_dtype: str = "auto"
    # Where the score stage gets the corpus's gradients -- model: a forward and backward pass per window
    # (exact); store: the gradient store a score pass wrote with store.enabled=true, read by Ray tasks with
    # no model (truncated EK-FAC, results keyed apart from exact ones; pipeline/store.py).
    source: str = "model"


# What ``score.source`` may be, and the dtypes of the gradient store.
SCORE_SOURCES = ("model", "store")
STORE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class StoreConfig:
    # The gradient store (docs/design.md#gradient-store): the score pass also writes, per shard, every window's
    # gradient rotated into the factors' top store.dim eigendirections per side and layer (Q_S,k^T G Q_A,k),
    # so that score.source=store answers a new query set without the model. Not with projection.mode=sketch.
    enabled: bool = False
    # Directions kept per Kronecker side and layer (k): k*k numbers per layer and window (capped by the
    # layer's sizes; with projection=curvature, dim >= projection.dim keeps everything: exact).
    dim: int = 32
    # bfloat16, float16 or float32: the stored numbers (bytes per window: layers * k * k * 2 or 4).
    dtype: str = "bfloat16"
    # With score.source=store -- 0: the store's (truncated) scores are the answer; m > 0 (>= score.top_k):
    # two-stage, the store shortlists its global top m windows and documents per query and polarity, then
    # the model scores exactly those windows and every other window of their documents, so the top-k is
    # exact EK-FAC whenever it lies in the shortlist (results keyed apart from both; docs/design.md).
    rescore: int = 0


@dataclass
class ClusterConfig:
    # Empty: start a local Ray in-process; otherwise the address to connect to (e.g. "auto").
    address: str = ""
    # Scoring/fitting actors; each holds one model.
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Memory one worker may use, in GiB, for the driver's check that the model fits before any worker starts.
    # 0: measured on the driver's machine when Ray is local (available RAM shared by the workers, or the free
    # memory of the GPU); not checked on a remote cluster.
    worker_memory_gb: float = 0.0
    # CPUs of the local Ray started when address is empty (0: all cores).
    local_num_cpus: int = 0
    # Restarts of a dead actor and retries of its task (outputs are committed last, so retries are safe).
    max_restarts: int = 3
    # Seconds to wait for nodes (an autoscaler) when the workers do not fit on the cluster; 0: fail at once.
    placement_timeout_s: float = 0.0
    # Seconds without a finished unit (or the workers not ready) before the run fails, logging what is in flight.
    # A fit unit of k shards (factors.docs_per_unit) gets k times this: the bound stays per shard of work.
    stall_timeout_s: float = 1800.0
    # Keep the workers for this driver process's next run when it would start them alike (same model, settings,
    # storage and worker resources), reset instead of new processes: for a notebook or test suite running jobs
    # one after another (8-14 s saved per worker on a 2-core VM). Kept workers a run does not take are killed
    # before it starts its own. One run at a time per process.
    reuse_workers: bool = False


@dataclass
class DemoConfig:
    # Where the generated demo (tokenizer, tiny model, corpus, queries) is cached.
    cache_dir: str = "outputs/demo-cache"
    # Print this many proponents per demo query at the end.
    show: int = 3


@dataclass
class AttributeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)
    factors: FactorsConfig = field(default_factory=FactorsConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    @property
    def uses_demo(self) -> bool:
        return not (self.model.path or self.corpus.path or self.queries.path)

    def validate(self) -> None:
        """Fail on the driver, naming the key, before any cluster time is spent."""
        from pipeline.layout import validate_name

        validate_name(self.run.id, "run.id")
        given = [bool(self.model.path), bool(self.corpus.path), bool(self.queries.path)]
        if any(given) and not all(given):
            raise ConfigError(
                "model.path, corpus.path and queries.path must be given together (all empty runs the demo); "
                f"got model.path={self.model.path!r}, corpus.path={self.corpus.path!r}, queries.path={self.queries.path!r}"
            )
        if self.model.precision not in PRECISIONS:
            raise ConfigError(f"model.precision must be one of {PRECISIONS}, got {self.model.precision!r}")
        if self.projection.mode not in MODES:
            raise ConfigError(f"projection.mode must be one of {MODES}, got {self.projection.mode!r}")
        checks = [
            (self.corpus.window is None or self.corpus.window >= 2,
             f"corpus.window must be >= 2 or null (the model's context), got {self.corpus.window}"),
            (self.corpus.on_bad_text in BAD_TEXT_ACTIONS,
             f"corpus.on_bad_text must be one of {BAD_TEXT_ACTIONS}, got {self.corpus.on_bad_text!r}"),
            (self.corpus.docs_per_shard >= 1, f"corpus.docs_per_shard must be >= 1, got {self.corpus.docs_per_shard}"),
            (self.factors.docs_per_unit >= 0,
             f"factors.docs_per_unit must be >= 0 (0 = one fit unit per shard), got {self.factors.docs_per_unit}"),
            (self.score.top_k >= 1, f"score.top_k must be >= 1, got {self.score.top_k}"),
            (self.score.batch_size >= 1, f"score.batch_size must be >= 1, got {self.score.batch_size}"),
            (self.score.product_dtype in SCORE_PRODUCT_DTYPES,
             f"score.product_dtype must be one of {SCORE_PRODUCT_DTYPES}, got {self.score.product_dtype!r}"),
            (self.factors.product_dtype in PRODUCT_DTYPES,
             f"factors.product_dtype must be one of {PRODUCT_DTYPES}, got {self.factors.product_dtype!r}"),
            (self.factors.eigh_dtype in EIGH_DTYPES,
             f"factors.eigh_dtype must be one of {EIGH_DTYPES}, got {self.factors.eigh_dtype!r}"),
            (self.factors.batch_size >= 1, f"factors.batch_size must be >= 1, got {self.factors.batch_size}"),
            (self.factors.sample_shards >= 0, f"factors.sample_shards must be >= 0, got {self.factors.sample_shards}"),
            (self.factors.max_documents >= 0,
             f"factors.max_documents must be >= 0 (0 = no cap), got {self.factors.max_documents}"),
            (0 < self.factors.lambda_sample <= 1,
             f"factors.lambda_sample must be in (0, 1] (1 = all fitting shards), got {self.factors.lambda_sample}"),
            (self.factors.lambda_max_documents >= 0,
             f"factors.lambda_max_documents must be >= 0 (0 = no cap), got {self.factors.lambda_max_documents}"),
            (0 <= self.factors.refit_below_share <= 1,
             f"factors.refit_below_share must be in [0, 1] (0: never refit for growth), got "
             f"{self.factors.refit_below_share}"),
            (self.projection.dim >= 0, f"projection.dim must be >= 0, got {self.projection.dim}"),
            (self.cluster.num_workers >= 1, f"cluster.num_workers must be >= 1, got {self.cluster.num_workers}"),
            (self.cluster.gpus_per_worker >= 0, "cluster.gpus_per_worker must be >= 0"),
            (self.cluster.cpus_per_worker > 0, "cluster.cpus_per_worker must be > 0"),
            (self.cluster.stall_timeout_s > 0, "cluster.stall_timeout_s must be > 0"),
            (self.cluster.placement_timeout_s >= 0, "cluster.placement_timeout_s must be >= 0"),
            (self.storage.timeout_s > 0 and self.storage.retries >= 0,
             "storage.timeout_s must be > 0 and storage.retries >= 0"),
            (self.cluster.worker_memory_gb >= 0, "cluster.worker_memory_gb must be >= 0 (0: measured)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_store()
        unknown = [s for s in self.run.stages if s not in STAGES]
        if unknown or not self.run.stages:
            raise ConfigError(f"run.stages must be a non-empty subset of {list(STAGES)}, got {list(self.run.stages)}")
        damping = self.factors.damping
        # The type is checked here too: OmegaConf refuses a non-number, a config built in Python is not checked.
        if damping is not None and (isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0):
            raise ConfigError(f"factors.damping must be a number >= 0 or null, got {damping!r}")
        if self.model.precision == "bf16" and self.cluster.gpus_per_worker <= 0:
            raise ConfigError("model.precision=bf16 needs GPU workers (cluster.gpus_per_worker > 0)")

    def _validate_store(self) -> None:
        if self.score.source not in SCORE_SOURCES:
            raise ConfigError(f"score.source must be one of {SCORE_SOURCES}, got {self.score.source!r}")
        if self.store.dtype not in STORE_DTYPES:
            raise ConfigError(f"store.dtype must be one of {STORE_DTYPES}, got {self.store.dtype!r}")
        if self.store.dim < 1:
            raise ConfigError(f"store.dim must be >= 1, got {self.store.dim}")
        if self.store.rescore < 0:
            raise ConfigError(f"store.rescore must be >= 0 (0: no rescoring), got {self.store.rescore}")
        if self.store.rescore and self.score.source != "store":
            raise ConfigError("store.rescore rescores the gradient store's shortlist: it needs score.source=store")
        if 0 < self.store.rescore < self.score.top_k:
            raise ConfigError(
                f"store.rescore={self.store.rescore} shortlists fewer windows than score.top_k={self.score.top_k} "
                "keeps; use store.rescore >= score.top_k"
            )
        uses_store = self.store.enabled or self.score.source == "store"
        if uses_store and self.projection.dim > 0 and self.projection.mode == "sketch":
            raise ConfigError(
                "the gradient store (store.enabled, score.source=store) needs the factors' eigenbasis of the "
                "captured gradients: use projection.dim=0 or projection.mode=curvature, not sketch"
            )

    def influence(self) -> InfluenceConfig:
        """The numeric core's view of this config."""
        return InfluenceConfig(
            modules=self.model.modules,
            projection=ProjectionSpec(self.projection.dim, self.projection.seed, self.projection.mode),
            damping=None if self.factors.damping is None else float(self.factors.damping),
            empirical_fisher=self.factors.empirical_fisher,
            precision=self.model.precision,
            query_rank=self.score.query_rank,
            product_dtype=self.score.product_dtype,
            fit_product_dtype=self.factors.product_dtype,
            eigh_dtype=self.factors.eigh_dtype,
            seed=self.run.seed,
        )

    def to_json(self) -> dict:
        """The resolved config for manifests, without storage options (they may hold secrets)."""
        d = asdict(self)
        d["storage"]["options"] = sorted(d["storage"]["options"])  # key names only
        return d


def store_schema(name: str, schema_cls: type, mandatory: tuple[str, ...] = ()) -> None:
    """Register ``schema_cls`` with Hydra's ConfigStore as ``name``.

    Hydra merges a group option's ``???`` onto the schema's default and keeps
    the default, so keys that an option declares mandatory (``storage/s3.yaml``:
    ``storage.root``; ``model/hf.yaml``: ``model.path``) get no default in the
    registered schema. Every shipped option of those groups sets them; the
    dataclass defaults are unchanged for callers in Python.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    schema = OmegaConf.structured(schema_cls)
    for key in mandatory:
        OmegaConf.update(schema, key, MISSING, merge=False)
    ConfigStore.instance().store(name=name, node=schema)


def to_typed(schema_cls: type, cfg):
    """A composed OmegaConf config to a validated ``schema_cls`` instance.

    Missing mandatory values are refused (merging ``???`` would silently keep
    a default: ``storage=s3`` without ``storage.root`` would write locally).
    """
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing mandatory value(s) {missing}; give them as overrides, e.g. {missing[0]}=...")
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_cls), cfg))
    if not isinstance(obj, schema_cls):
        raise TypeError(f"config did not convert to {schema_cls.__name__}")
    obj.validate()
    return obj


def register_configs() -> None:
    """Register the main job's schema (conf/attribute.yaml is validated against it)."""
    store_schema("attribute_schema", AttributeConfig, mandatory=("storage.root", "model.path"))


def to_config(cfg) -> AttributeConfig:
    """An OmegaConf config (from Hydra) to a validated ``AttributeConfig``."""
    return to_typed(AttributeConfig, cfg)
