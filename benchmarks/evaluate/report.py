"""The evaluation's JSON as plain-text tables, one per section present."""

from __future__ import annotations

from benchmarks.common import format_number as _fmt


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
    for key, section in (("facts", _facts), ("backdoor", _backdoor), ("fidelity", _fidelity),
                         ("small_world", _small_world), ("smollm2", _smollm2)):
        if result.get(key):
            out += section(result[key])
    out.append(f"\ntotal {result['timings_s']['total']:.1f} s; written to {result.get('url', '-')}")
    return "\n".join(out)


def _facts(facts: dict) -> list[str]:
    k = facts["recall_k"]
    out = [f"\nPlanted facts: {facts['n_learned']}/{facts['n_facts']} learned "
           f"(learned/total by copies: {facts['learned_by_copies']}); metrics over learned facts"]
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
    return out


def _backdoor(bd: dict) -> list[str]:
    first = next(iter(bd["methods"].values()))
    pk = [k for k in first if k.startswith("precision_at_") and k != "precision_at_n_poisoned"]
    return [
        f"\nBackdoor: {bd['n_poisoned']}/{bd['n_docs']} documents poisoned; log p(continuation) "
        f"{bd['backdoor_logprob']['with_trigger']:.2f} with trigger vs "
        f"{bd['backdoor_logprob']['without_trigger']:.2f} without",
        _table(["method", "auprc", "precision@n_poisoned"] + [p.replace("_at_", "@") for p in pk],
               [[n, m["auprc"], m["precision_at_n_poisoned"]] + [m[p] for p in pk] for n, m in bd["methods"].items()]),
    ]


def _fidelity(fid: dict) -> list[str]:
    rec = fid["recommended"]
    return [
        f"\nProjection fidelity vs unprojected EK-FAC ({fid['n_windows']} windows x {fid['n_queries']} "
        f"queries; full size {fid['full_size']} numbers per gradient)",
        _table(["mode", "dim", "size", "spearman", "spearman_min", "topk_overlap"],
               [[r["mode"], r["dim"], r["projected_size"], r["spearman"], r["spearman_min"], r["topk_overlap"]]
                for r in fid["settings"]]),
        f"recommended: mode={rec['mode']} dim={rec['dim']} (spearman {_fmt(rec['spearman'])}, "
        f"top-k overlap {_fmt(rec['topk_overlap'])})",
    ]


def _small_world(sw: dict) -> list[str]:
    out = [f"\nSmall world: {sw['n_train']} windows, {sw['n_queries']} queries, "
           f"{sw['model']['tracked_params']} tracked params"]
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
    return out


def _smollm2(sec: dict) -> list[str]:
    if "ceiling" not in sec:  # a partial result: cost rows only
        return [f"\nSmolLM2 sweep (partial): {[r['name'] for r in sec.get('settings', [])]}"]
    c, k = sec["ceiling"], sec["facts"]["recall_k"]
    out = [f"\nSmolLM2 facts: {sec['n_docs']} documents, {sec['n_windows']} windows of <= {sec['window']} tokens, "
           f"{sec['n_queries']} queries. Agreement with exact EK-FAC over all {sec['fidelity_windows']} windows; "
           f"cost on {sec['cost_windows']} windows (ceiling {c['tokens_per_s']:.0f} tokens/s, {c['seconds']:.1f} s)",
           _table(["setting", "spearman", "spearman_min", "top10_overlap", "score/ceiling", "fit_passes",
                   "fit_passes_no_eigh", "eigh_s", "precondition_s", "peak_rss_mib"],
                  [[r["name"], r["spearman"], r["spearman_min"], r["topk_overlap"], r["score_to_ceiling"],
                    r["fit_ceiling_passes"], r["fit_passes_without_eigh"], r["eigendecompose_s"],
                    r["precondition_s"], r["peak_rss_mib"]] for r in sec["settings"]])]
    ch = sec["chosen_default"]
    out.append(f"chosen default: {ch['name']} ({ch['reason']}; top-k overlap {_fmt(ch['topk_overlap'])} >= "
               f"{ch['min_topk_overlap']}); qualifying: {ch['qualifying']}")
    methods = sec["facts"]["methods"]
    out.append(f"Planted facts ({sec['facts']['n_facts']} facts, document level):")
    out.append(_table(["method", "strict_recall", f"recall@{k}", "mrr"],
                      [[n, m["strict_recall"], m[f"recall_at_{k}"], m["mrr"]] for n, m in methods.items()]))
    return out
