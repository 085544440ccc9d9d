"""Attribution quality: planted facts, a backdoor, projection fidelity, an exact oracle and LDS.

``benchmarks.evaluate.run.run_evaluation(EvaluateConfig(...))`` trains its
tiny models in the job (seeded; minutes on a CPU), scores them with our
EK-FAC (projection off and the pipeline's default projection) and with the
baselines of ``benchmarks.baselines`` (BM25, RepSim, gradient dot product,
gradient cosine, chance), and writes every figure as JSON to
``{storage.root}/evaluations/{name}.json``; ``report.format_report`` prints
it. One module per experiment, each of which can be switched off:

- ``facts``: planted facts and projection fidelity on the demo model.
- ``backdoor``: a trigger phrase planted in a few documents.
- ``small_world``: the exact oracle, kronfluence and LDS on a GPT-2 small
  enough for a dense Fisher.

``config`` holds the schema and its defaults, ``world`` loads the demo,
``scoring`` scores every method of one model from shared captures.
"""
