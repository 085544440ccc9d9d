"""The benchmark's headline figures as a plain-text table."""

from __future__ import annotations

from benchmarks.common import format_number


def format_report(result: dict) -> str:
    """The headline figures as a plain-text table."""
    m = result["machine"]
    lines = [f"benchmark {result['name']} on {result['device']} ({m['cpu_count']} CPUs {m['cpu_model']}, "
             f"GPU {m['gpu']}, torch {m['torch']}, load {m.get('load_average_1m')})"]
    if "model" in result:
        lines.append(f"model: {result['model']['parameters']:,} parameters {result['model']['config']}; "
                     f"N = {result['corpus']['n_docs']} documents, window {result['corpus']['window']}; "
                     f"default projection {result['projection_default']}")
    tp = result.get("throughput", {})
    rows = [("ceiling fwd+bwd tokens/s", result.get("ceiling_tokens_per_s")),
            ("score tokens/s (default projection)", result.get("score_tokens_per_s")),
            ("  ratio to ceiling", result.get("score_to_ceiling_ratio")),
            ("score tokens/s (dim=0)", result.get("score_tokens_per_s_dim0")),
            ("  ratio to ceiling", result.get("score_to_ceiling_ratio_dim0"))]
    for q in result.get("ours_seconds", {}):
        rows += [(f"{q} queries: ours s", result["ours_seconds"][q]),
                 (f"{q} queries: ours' fit in ceiling passes", result["fit_ceiling_passes"][q]),
                 (f"{q} queries: kronfluence s", result["kronfluence_seconds"].get(q)),
                 (f"{q} queries: speedup vs kronfluence", result["speedup_vs_kronfluence"].get(q)),
                 (f"{q} queries: top-k overlap vs kronfluence", result["topk_overlap_vs_kronfluence"].get(q))]
        if "speedup_vs_kronfluence_longest_first" in result:
            rows += [(f"{q} queries: kronfluence (longest first) s", result["kronfluence_longest_first_seconds"].get(q)),
                     (f"{q} queries: speedup vs it", result["speedup_vs_kronfluence_longest_first"].get(q))]
        if "topk_overlap_vs_kronfluence_dim0" in result:
            rows.append((f"{q} queries: top-k overlap (dim=0)", result["topk_overlap_vs_kronfluence_dim0"].get(q)))
    mem = result.get("memory")
    if mem:
        for n, run in mem["runs"].items():
            rows.append((f"worker peak RSS MiB at {n} docs", run["peak_rss_mib"]))
    rows += [("RSS ratio 10x corpus", result.get("rss_ratio_10x")),
             ("merge rows/s", result.get("merge_rows_per_s")),
             ("scaling 2 workers / 1", result.get("scaling_2_workers"))]
    width = max(len(r[0]) for r in rows)
    lines += [f"{name.ljust(width)}  {format_number(value, significant=True)}" for name, value in rows]
    if tp:
        lines.append(f"(throughput: median of {tp['repeats']} repeats after {tp['warmup']} warm-up; "
                     f"end-to-end: median of {result['config']['pipeline_repeats']} run(s))")
    for key, note in result.get("notes", {}).items():
        lines.append(f"note [{key}]: {note}")
    lines.append(f"total {result['seconds_total']:.1f} s; written to {result.get('url', '-')}")
    return "\n".join(lines)
