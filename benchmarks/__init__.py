"""Measurement of the attribution pipeline, kept apart from the product package ``pipeline``.

- ``benchmarks.evaluate``: attribution quality (planted facts, a backdoor,
  projection fidelity, an exact oracle, LDS); run by ``jobs/evaluate.py``.
- ``benchmarks.speed``: speed and memory (throughput against a plain
  forward + backward, kronfluence, worker RSS, merge, Ray scaling); run by
  ``jobs/benchmark.py``.
- ``benchmarks.baselines`` and ``benchmarks.metrics``: the methods compared
  against and the ranking metrics, shared by both.
- ``benchmarks.common``: device, threads, machine description, JSON and
  number formatting for both jobs.

Nothing in ``pipeline`` imports from here.
"""
