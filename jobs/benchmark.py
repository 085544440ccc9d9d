"""Speed and memory: ceiling vs scoring throughput, kronfluence, worker RSS, merge, Ray scaling.

Everything is measured in one run on the same model, corpus and machine;
prints a table and writes ``{storage.root}/benchmarks/{name}.json``.

    python jobs/benchmark.py                                  # the published CPU figures (demo model)
    python jobs/benchmark.py name=quick n_docs=32 query_counts=[3,5] merge.rows=100000 \
        memory.n_docs=16 repeats=2 throughput_batches=4       # CPU-sized, a few minutes
    python jobs/benchmark.py name=gpu model.preset=gpt2-small device=cuda window=512 texts_per_doc=8 batch_size=16
    python jobs/benchmark.py name=smollm2 model.preset=smollm2 window=128 threads=2 n_docs=128 \
        'query_counts=[100]' throughput_queries=100 memory.enabled=false merge.enabled=false scaling=false \
        throughput_batches=4 repeats=1 warmup=0                  # SmolLM2-135M, the default (docs/figures.md)

Config: conf/benchmark.yaml (schema, defaults and field docs: benchmarks/speed/config.py, BenchmarkConfig).
"""

import hydra

from benchmarks.speed.config import register_configs, to_config
from benchmarks.speed.report import format_report
from benchmarks.speed.run import run_benchmark
from pipeline.jobs_common import exit_on_bad_input

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg) -> None:
    with exit_on_bad_input():
        print(format_report(run_benchmark(to_config(cfg))))


if __name__ == "__main__":
    main()
