"""``BenchmarkConfig``: the schema of ``jobs/benchmark.py`` and every default of its published CPU run.

``conf/benchmark.yaml`` composes this schema and says only what differs; the
defaults here are the settings docs/figures.md was measured with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from benchmarks.common import DemoWorldConfig
from pipeline.config import AttributeConfig, StorageConfig, store_schema, to_typed
from pipeline.core.influence import SCORE_PRODUCT_DTYPES, InfluenceConfig
from pipeline.core.projection import MODES, ProjectionSpec
from pipeline.errors import ConfigError

PRESETS = {
    # The demo's trained tiny GPT-2 (2 x 128 by default).
    "demo": None,
    # GPT-2 small's architecture (12 layers x 768, 12 heads), random init, with the demo tokenizer.
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
    # SmolLM2-135M fine-tuned on planted facts (benchmarks.smollm2_facts): its model, and its 128 documents
    # (cycled to n_docs) as the corpus and the queries' source text.
    "smollm2": None,
}

# How "ours" is run in the comparison with kronfluence.
OURS = ("pipeline", "core")
# Where the benchmark corpus's texts come from (corpus_text).
CORPUS_TEXTS = ("preset", "pydoc")


@dataclass
class BenchModelConfig:
    # demo | gpt2-small | smollm2 (see PRESETS); ignored when path is set.
    preset: str = "demo"
    # Where the smollm2 preset's pretrained model is cached (pipeline.pretrained; built there if absent).
    pretrained_cache_dir: str = "outputs/pretrained-cache"
    # A Hugging Face model directory with safetensors weights (local); empty: the preset.
    path: str = ""


@dataclass
class MemoryConfig:
    enabled: bool = True
    # Corpus sizes N and 10 N (documents) scored by one worker process each.
    n_docs: int = 128
    factor: int = 10
    docs_per_shard: int = 64


@dataclass
class MergeConfig:
    enabled: bool = True
    # Rows of synthetic shard results merged (10 million for the published figure).
    rows: int = 10_000_000
    queries: int = 100
    top_k: int = 50


@dataclass
class BenchmarkConfig:
    # The result is written to {storage.root}/benchmarks/{name}.json.
    name: str = "default"
    storage: StorageConfig = field(default_factory=StorageConfig)
    # auto: cuda if available, else cpu.
    device: str = "auto"
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    demo: DemoWorldConfig = field(default_factory=DemoWorldConfig)
    # Corpus size N in documents (demo documents cycled under new ids).
    n_docs: int = 256
    # Demo texts joined into one benchmark document (raise it with long windows so windows fill up).
    texts_per_doc: int = 1
    # The texts cycled into the corpus: preset (the model preset's: the demo corpus, or the smollm2 preset's 128
    # planted-facts documents) or pydoc (1,063 distinct paragraphs of Python's help topics, pydoc_data.topics, in
    # sorted topic order; no repeats up to that many documents, so no exact ties between copies in a top-k).
    corpus_text: str = "preset"
    window: int = 64
    batch_size: int = 8
    # Batches timed in the ceiling and score measurements; queries scored there.
    throughput_batches: int = 16
    throughput_queries: int = 10
    warmup: int = 1
    repeats: int = 3
    # Query counts of the comparison with kronfluence; [] leaves that phase out (throughput and the rest only).
    query_counts: list[int] = field(default_factory=lambda: [10, 100])
    kronfluence: bool = True
    # Also time kronfluence with its fit and training windows batched longest first, as ours are
    # (pipeline.core.text.longest_first): it pads less too. The headline speedup is against kronfluence fed the
    # corpus in its order (as a user gives it a dataset); this one is the speedup without our batching's share.
    kronfluence_longest_first: bool = True
    # Time kronfluence fed the windows in corpus order (the headline speedup). false with kronfluence_longest_first
    # runs only the longest-first one (half the time on a large corpus); ours' overlap is then against it.
    kronfluence_corpus_order: bool = True
    # Also time ours with projection off (dim 0) in the kronfluence comparison.
    compare_dim0: bool = True
    # Runs per end-to-end measurement (median).
    pipeline_repeats: int = 1
    # pipeline: the Ray pipeline end to end (run_attribution on a local Ray); core: the in-process core.
    ours: str = "pipeline"
    # Documents per shard in the pipeline runs (several shards per worker, so workers share the corpus).
    docs_per_shard: int = 32
    # Ray workers compared in the scaling measurement.
    scaling_workers: list[int] = field(default_factory=lambda: [1, 2])
    scaling: bool = True
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    top_k: int = 10
    # torch intra-op threads of the driver (0: torch's default); the memory worker gets the same.
    threads: int = 0
    # Scratch folder for corpora, models and pipeline runs (removed at the end); empty: the system temp.
    work_dir: str = ""
    # Our setting; null takes the attribution job's default (pipeline.config.AttributeConfig).
    projection_dim: Optional[int] = None
    projection_mode: Optional[str] = None
    # score.query_rank of every run of ours (null: the attribution default); dense projection-off queries
    # of a real model need (tracked parameters x 4 bytes) each, 318 MB for SmolLM2-135M's MLP layers.
    query_rank: Optional[int] = None
    # factors.empirical_fisher of ours and of kronfluence (null: the attribution default, sampled labels).
    # true compares the two implementations without the noise of two different label samples.
    empirical_fisher: Optional[bool] = None
    # score.product_dtype of every run of ours (null: the attribution default, auto): auto, float32, bfloat16 or int8.
    product_dtype: Optional[str] = None
    # factors.lambda_sample of our pipeline runs (null: the attribution default).
    lambda_sample: Optional[float] = None
    # factors.lambda_max_documents of our pipeline runs (null: the attribution default). kronfluence's fit
    # keeps its defaults (covariance_max_examples = lambda_max_examples = 100,000: every document of any corpus
    # the benchmark builds), so a smaller cap is ours alone.
    lambda_max_documents: Optional[int] = None
    # factors.max_documents of our pipeline runs (null: the attribution default). When it leaves documents out,
    # kronfluence's fit gets the windows of the same documents (the sample our job chooses), as its own
    # covariance/lambda_max_examples caps would give it on a corpus past 100,000 examples; both score every window.
    max_documents: Optional[int] = None

    def score_product_dtype(self) -> str:
        """``product_dtype``, else the attribution job's ``score.product_dtype``."""
        return AttributeConfig().score.product_dtype if self.product_dtype is None else str(self.product_dtype)

    def fisher_empirical(self) -> bool:
        """``empirical_fisher``, else the attribution job's ``factors.empirical_fisher``."""
        return AttributeConfig().factors.empirical_fisher if self.empirical_fisher is None else bool(self.empirical_fisher)

    def validate(self) -> None:
        from pipeline.layout import validate_name

        validate_name(self.name, "name")
        if not self.model.path and self.model.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {self.model.preset!r}")
        if self.projection_mode is not None and self.projection_mode not in MODES:
            raise ConfigError(f"projection_mode must be one of {MODES} or null, got {self.projection_mode!r}")
        if self.projection_dim is not None and self.projection_dim < 0:
            raise ConfigError(f"projection_dim must be >= 0 (0: off) or null, got {self.projection_dim}")
        if self.query_rank is not None and self.query_rank < 0:
            raise ConfigError(f"query_rank must be >= 0 (0: dense) or null, got {self.query_rank}")
        if self.product_dtype is not None and self.product_dtype not in SCORE_PRODUCT_DTYPES:
            raise ConfigError(
                f"product_dtype must be one of {SCORE_PRODUCT_DTYPES} or null, got {self.product_dtype!r}"
            )
        if self.lambda_sample is not None and not 0 < self.lambda_sample <= 1:
            raise ConfigError(f"lambda_sample must be in (0, 1] or null, got {self.lambda_sample}")
        if self.lambda_max_documents is not None and self.lambda_max_documents < 0:
            raise ConfigError(f"lambda_max_documents must be >= 0 or null, got {self.lambda_max_documents}")
        if self.max_documents is not None and self.max_documents < 0:
            raise ConfigError(f"max_documents must be >= 0 or null, got {self.max_documents}")
        if self.kronfluence and self.query_counts and not (self.kronfluence_corpus_order
                                                            or self.kronfluence_longest_first):
            raise ConfigError("kronfluence_corpus_order and kronfluence_longest_first are both false: set one true, "
                              "or kronfluence=false to leave kronfluence out")
        if self.corpus_text not in CORPUS_TEXTS:
            raise ConfigError(f"corpus_text must be one of {CORPUS_TEXTS}, got {self.corpus_text!r}")
        if self.ours not in OURS:
            raise ConfigError(f"ours must be one of {OURS}, got {self.ours!r}")
        checks = [
            (self.n_docs >= 1 and self.texts_per_doc >= 1, "n_docs and texts_per_doc must be >= 1"),
            (self.window >= 8, "window must be >= 8"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.throughput_batches >= 1, "throughput_batches must be >= 1"),
            (self.repeats >= 1 and self.warmup >= 0, "repeats must be >= 1 and warmup >= 0"),
            (self.pipeline_repeats >= 1, "pipeline_repeats must be >= 1"),
            (all(int(q) >= 1 for q in self.query_counts), "query_counts must be >= 1"),
            (self.memory.n_docs >= 1 and self.memory.factor >= 2, "memory.n_docs >= 1 and memory.factor >= 2"),
            (self.merge.rows >= 1 and self.merge.queries >= 1 and self.merge.top_k >= 1, "merge sizes must be >= 1"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.docs_per_shard >= 1, "docs_per_shard must be >= 1"),
            (self.threads >= 0, "threads must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def projection(self) -> ProjectionSpec:
        """Our projection: ``projection_dim`` / ``projection_mode``, else the attribution job's default."""
        p = AttributeConfig().projection
        dim = p.dim if self.projection_dim is None else int(self.projection_dim)
        mode = p.mode if self.projection_mode is None else str(self.projection_mode)
        return ProjectionSpec(dim, p.seed, mode)

    def score_query_rank(self) -> int:
        """``query_rank``, else the attribution job's ``score.query_rank``."""
        return AttributeConfig().score.query_rank if self.query_rank is None else int(self.query_rank)

    def influence(self, dim: int | None = None) -> InfluenceConfig:
        """Our EK-FAC (the attribution job's defaults unless overridden); ``dim`` overrides the projection dimension."""
        d = AttributeConfig()
        spec = self.projection()
        if dim is not None:
            spec = ProjectionSpec(dim, spec.seed, spec.mode)
        return InfluenceConfig(projection=spec, damping=d.factors.damping, empirical_fisher=self.fisher_empirical(),
                               query_rank=self.score_query_rank(), product_dtype=self.score_product_dtype())


def register_configs() -> None:
    """Register ``BenchmarkConfig`` as ``benchmark_schema`` (its YAML in conf/ is validated against it)."""
    store_schema("benchmark_schema", BenchmarkConfig, mandatory=("storage.root",))


def to_config(cfg) -> BenchmarkConfig:
    """An OmegaConf config (from Hydra) to a validated ``BenchmarkConfig``."""
    return to_typed(BenchmarkConfig, cfg)
