"""Speed and memory of the attribution pipeline, measured side by side in one run.

``benchmarks.speed.run.run_benchmark(BenchmarkConfig(...))`` measures, on
one model, corpus and machine, and writes
``{storage.root}/benchmarks/{name}.json``; one module per measurement:
``throughput`` (ceiling and score tokens/s), ``versus_kronfluence``,
``memory`` (worker RSS), ``merge``, ``scaling`` (Ray workers). ``inputs``
prepares the model, corpus and queries; ``report`` prints the headline
table. Nothing is imported here, so the memory worker process
(``python -m benchmarks.speed.memory``) loads only what it measures.
"""
