"""Scaling: score-stage throughput of the Ray pipeline with 1, 2, ... workers on the same corpus."""

from __future__ import annotations

import statistics

import torch

from benchmarks.speed.config import BenchmarkConfig
from benchmarks.speed.inputs import BenchInputs
from benchmarks.speed.versus_kronfluence import ours_pipeline


def scaling(cfg: BenchmarkConfig, inputs: BenchInputs, device: torch.device, work: str) -> dict:
    """Per worker count: score-stage seconds and windows/s, end-to-end seconds (medians of ``pipeline_repeats``)."""
    n_queries = int(cfg.query_counts[0])
    out = {"queries": n_queries, "pipeline_repeats": cfg.pipeline_repeats, "by_workers": {}}
    for workers in [int(w) for w in cfg.scaling_workers]:
        runs = [ours_pipeline(cfg, inputs, n_queries, None, work, f"scale-w{workers}-r{r}", device, workers)
                for r in range(cfg.pipeline_repeats)]
        score_s = statistics.median(r["timings"]["score_s"] for r in runs)
        windows = runs[-1]["counts"].get("num_windows", 0)
        out["by_workers"][str(workers)] = {
            "score_s": score_s, "score_windows_per_s": windows / score_s if score_s else None,
            "end_to_end_s": statistics.median(r["seconds"] for r in runs), "num_windows": windows,
            "stage_timings": runs[-1]["timings"],
        }
    return out
