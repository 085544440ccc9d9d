"""A run's report, ``runs/{run_id}/report.html``: one self-contained HTML file (no scripts, no network).

Built from the run's tables (`pipeline.tables`) and manifest only, so it can
be rebuilt from storage at any time (``write_report``). Per query: prompt and
completion with ``log p(completion | prompt)``; the top proponents and
opponents as token heatmaps (a token's colour is its share of the window's
score: green raises the completion's log-probability, red lowers it) with
per-layer bars; a plot of the kept scores by rank (influence is heavy
tailed: a few windows carry most of it); the top documents. A summary on top
gives the provenance and the stage times. Every text from the data is
HTML-escaped; U+FFFD (a token boundary inside a multi-byte character) and
special tokens are marked.
"""

from __future__ import annotations

import html
import logging

import pyarrow as pa

from pipeline import layout
from pipeline.decoding import REPLACEMENT
from pipeline.tables import ATTRIBUTION, DOCUMENTS, LAYERS, QUERIES, SCHEMAS, TABLES, TOKENS, RunMetadata

log = logging.getLogger(__name__)

POSITIVE = (22, 128, 60)  # rgb of a proponent's colour
NEGATIVE = (196, 30, 58)
DOCUMENTS_SHOWN = 10
ROWS_SHOWN = 20  # ranked windows shown per (query, polarity); the tables hold all of them

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}code,.mono{font-family:ui-monospace,monospace;font-size:12px}
.heat{font-family:ui-monospace,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-all;
border:1px solid #ddd;padding:6px;background:#fafafa}
.tok{border-radius:2px}.special{outline:1px dashed #666}.bad{outline:1px solid #b00;background:#fdd}
.row{margin:10px 0 18px}.completion{background:#fff3b0}.note{color:#666}.empty{color:#b00}
"""


def read_run(storage, run_id: str) -> tuple[dict[str, pa.Table], dict, dict]:
    """The run's tables (an empty one for each table not written), its manifest (``{}`` if none), metadata."""
    tables, meta = {}, {}
    for name in TABLES:
        url = layout.run_table_part(storage.root, run_id, name)
        if storage.exists(url):
            tables[name] = storage.read_parquet(url)
            meta = meta or RunMetadata.from_parquet(tables[name].schema.metadata)
        else:
            tables[name] = SCHEMAS[name].empty_table()
    manifest_url = layout.run_manifest(storage.root, run_id)
    manifest = storage.read_json(manifest_url) if storage.exists(manifest_url) else {}
    return tables, manifest, meta


def write_report(storage, run_id: str) -> str:
    """Build the report from the run's stored tables and manifest, write it; returns its URL."""
    tables, manifest, meta = read_run(storage, run_id)
    url = layout.run_report(storage.root, run_id)
    storage.write_bytes(url, render_report(run_id, tables, manifest, meta).encode("utf-8"))
    log.info("report: %s", url)
    return url


# ---- rendering ------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render_report(run_id: str, tables: dict[str, pa.Table], manifest: dict, meta: dict) -> str:
    """The whole HTML page (a string); ``tables`` keyed by `pipeline.tables` names."""
    rows = {name: tables[name].to_pylist() for name in TABLES}
    query_ids = sorted(
        {r["query_id"] for r in rows[QUERIES]} | {r["query_id"] for r in rows[ATTRIBUTION]}
    )
    queries = {r["query_id"]: r for r in rows[QUERIES]}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Attribution report: {esc(run_id)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Attribution report: run <code>{esc(run_id)}</code></h1>",
        _summary(run_id, manifest, meta, rows),
    ]
    if not query_ids:
        parts.append("<p class='empty' id='no-queries'>This run has no queries and no ranked rows.</p>")
    else:
        parts.append("<h2>Queries</h2><ul>")
        parts += [f"<li><a href='#{_anchor(q)}'>{esc(q)}</a></li>" for q in query_ids]
        parts.append("</ul>")
    for q in query_ids:
        parts.append(_query_section(q, queries.get(q), rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _anchor(query_id: str) -> str:
    return "q-" + "".join(c if c.isalnum() or c in "-_" else f"_{ord(c):x}_" for c in query_id)


def _summary(run_id: str, manifest: dict, meta: dict, rows: dict) -> str:
    model = manifest.get("model", {})
    corpus = manifest.get("corpus", {})
    counts = manifest.get("counts", {})
    facts = [
        ("run id", run_id),
        ("created at", manifest.get("created_at", "")),
        ("model", f"{model.get('path', '')} (fingerprint {model.get('fingerprint', meta.get('model_fingerprint', ''))})"),
        ("factors id", manifest.get("factors_id", meta.get("factors_id", ""))),
        ("queries id", manifest.get("queries_id", meta.get("queries_id", ""))),
        ("config digest", meta.get("config_digest", "")),
        ("corpus", f"{corpus.get('path', '')} (fingerprint {corpus.get('fingerprint', '')})"),
        ("character spans", meta.get("char_spans", "") or "unknown"),
        ("documents / windows / tokens", f"{counts.get('num_docs', '?')} / {counts.get('num_windows', '?')} / "
                                         f"{counts.get('num_tokens', '?')}"),
        ("shards", counts.get("num_shards", len(manifest.get("shards", [])))),
        ("skipped documents", counts.get("num_skipped_docs", 0)),
        ("non-finite windows", counts.get("num_nonfinite_windows", 0)),
        ("scoring products", ", ".join(counts.get("scoring_products") or []) or "not recorded"),
        ("ranked rows", len(rows[ATTRIBUTION])),
    ]
    out = ["<h2>Summary</h2><table id='summary'>"]
    out += [f"<tr><th>{esc(k)}</th><td class='mono'>{esc(v)}</td></tr>" for k, v in facts]
    out.append("</table>")
    timings = {k: v for k, v in manifest.get("timings", {}).items() if isinstance(v, (int, float))}
    if timings:
        out.append("<h3>Stage times (seconds)</h3>")
        out.append(_bars([(k.removesuffix("_s"), float(v)) for k, v in timings.items()], "s", "stage-times"))
    if not rows[ATTRIBUTION]:
        out.append("<p class='empty'>No ranked rows: the run scored no shard, or no window had a nonzero score.</p>")
    return "\n".join(out)


def _query_section(query_id: str, query: dict | None, rows: dict) -> str:
    out = [f"<section id='{_anchor(query_id)}' data-query-id='{esc(query_id)}'>", f"<h2>Query {esc(query_id)}</h2>"]
    if query is not None:
        out.append(
            f"<p class='heat'>{esc(query['prompt'])}<span class='completion'>{esc(query['completion'])}</span></p>"
            f"<p>log p(completion | prompt) = {_num(query['log_prob'])} over "
            f"{esc(query['num_completion_tokens'])} completion tokens</p>"
        )
    ranked = [r for r in rows[ATTRIBUTION] if r["query_id"] == query_id]
    tokens = [r for r in rows[TOKENS] if r["query_id"] == query_id]
    layers = [r for r in rows[LAYERS] if r["query_id"] == query_id]
    out.append(f"<h3>Kept scores by rank ({len(ranked)} windows)</h3>")
    out.append(_distribution(ranked))
    for polarity, title in (("proponent", "Top proponents"), ("opponent", "Top opponents")):
        out.append(f"<h3>{title}</h3>")
        mine = [r for r in ranked if r["polarity"] == polarity and r["rank"] <= ROWS_SHOWN]
        if not mine:
            out.append(f"<p class='note'>No {polarity}s.</p>")
        for r in mine:
            key = (r["polarity"], r["rank"])
            toks = [t for t in tokens if (t["polarity"], t["rank"]) == key]
            lays = [x for x in layers if (x["polarity"], x["rank"]) == key]
            out.append(_row(r, toks, lays))
    docs = [r for r in rows[DOCUMENTS] if r["query_id"] == query_id and r["rank"] <= DOCUMENTS_SHOWN]
    if docs:
        out.append("<h3>Top documents (sum of their windows' scores)</h3><table><tr><th>polarity</th><th>rank</th>"
                   "<th>document</th><th>score</th><th>windows</th></tr>")
        out += [f"<tr><td>{esc(d['polarity'])}</td><td>{d['rank']}</td><td class='mono'>{esc(d['doc_id'])}</td>"
                f"<td>{_num(d['score'])}</td><td>{esc(d['num_windows'])}</td></tr>" for d in docs]
        out.append("</table>")
    out.append("</section>")
    return "\n".join(out)


def _row(r: dict, tokens: list[dict], layers: list[dict]) -> str:
    span = "" if r.get("char_start") is None else f", characters {r['char_start']}-{r['char_end']}"
    head = (f"<div class='row' data-doc-id='{esc(r['doc_id'])}'><b>#{r['rank']}</b> <code>{esc(r['doc_id'])}</code> "
            f"window {r['window']}{span}, score {_num(r['score'])}")
    if not tokens:
        return f"{head}<div class='heat'>{_text(r.get('text') or '')}</div></div>"
    scale = max(abs(t["score"]) for t in tokens) or 1.0
    cells = "".join(_token(t, scale) for t in tokens)
    bars = _bars([(x["layer"], x["score"]) for x in layers], "", None) if layers else ""
    return f"{head}<div class='heat'>{cells}</div>{bars}</div>"


def _token(t: dict, scale: float) -> str:
    share = t["score"]
    rgb = POSITIVE if share >= 0 else NEGATIVE
    alpha = min(1.0, abs(share) / scale) * 0.85
    classes = "tok" + (" special" if t["special"] else "")
    title = f"token {t['position']} id {t['token_id']}: {share:+.4g}" + (" (special token)" if t["special"] else "")
    return (f"<span class='{classes}' style='background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})' "
            f"title='{esc(title)}'>{_text(t['token_text'] or '')}</span>")


def _text(text: str) -> str:
    """Escaped text with each U+FFFD marked as a token boundary inside a multi-byte character."""
    mark = ("<span class='bad' title='a token boundary inside a multi-byte character (invalid UTF-8 "
            f"replaced)'>{REPLACEMENT}</span>")
    return mark.join(esc(piece) for piece in text.split(REPLACEMENT))


def _num(x) -> str:
    return "n/a" if x is None else f"{x:+.4g}"


def _bars(items: list[tuple[str, float]], unit: str, element_id: str | None) -> str:
    """Horizontal bars (inline SVG), one per ``(label, value)``; negative values in red."""
    width, label_w, row_h = 640, 240, 18
    biggest = max((abs(v) for _, v in items), default=0.0) or 1.0
    has_negative = any(v < 0 for _, v in items)
    zero = label_w + (width - label_w) / 2 if has_negative else label_w
    span = (width - label_w) / (2 if has_negative else 1) - 60
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{row_h * len(items) + 4}'"
           + (f" id='{esc(element_id)}'" if element_id else "") + ">"]
    for i, (label, value) in enumerate(items):
        y, length = i * row_h + 2, abs(value) / biggest * span
        x = zero - length if value < 0 else zero
        rgb = NEGATIVE if value < 0 else POSITIVE
        out.append(f"<text x='0' y='{y + 12}' font-size='11'>{esc(label)}</text>"
                   f"<rect x='{x:.1f}' y='{y}' width='{max(length, 0.5):.1f}' height='{row_h - 4}' "
                   f"fill='rgb{rgb}'/><text x='{(x + length + 4) if value >= 0 else x - 4:.1f}' y='{y + 12}' "
                   f"font-size='11' text-anchor='{'start' if value >= 0 else 'end'}'>{value:.4g}{esc(unit)}</text>")
    out.append("</svg>")
    return "".join(out)


def _distribution(ranked: list[dict]) -> str:
    """The kept window scores against their rank (proponents up, opponents down), inline SVG."""
    if not ranked:
        return "<p class='note'>No ranked windows.</p>"
    width, height, pad = 640, 180, 30
    n = max(r["rank"] for r in ranked)
    biggest = max(abs(r["score"]) for r in ranked) or 1.0
    mid = height / 2
    bar_w = max(1.0, (width - 2 * pad) / n - 1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' class='distribution'>",
           f"<line x1='{pad}' y1='{mid}' x2='{width - pad}' y2='{mid}' stroke='#999'/>"]
    for r in ranked:
        h = abs(r["score"]) / biggest * (mid - 12)
        x = pad + (r["rank"] - 1) * (width - 2 * pad) / n
        y = mid - h if r["score"] > 0 else mid
        rgb = POSITIVE if r["score"] > 0 else NEGATIVE
        out.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{bar_w:.1f}' height='{max(h, 0.5):.1f}' fill='rgb{rgb}'>"
                   f"<title>{esc(r['polarity'])} #{r['rank']}: {r['score']:.4g}</title></rect>")
    out.append(f"<text x='{pad}' y='10' font-size='10'>+{biggest:.3g}</text>"
               f"<text x='{pad}' y='{height - 2}' font-size='10'>-{biggest:.3g}</text>"
               f"<text x='{width - pad}' y='{height - 2}' font-size='10' text-anchor='end'>rank 1..{n}</text></svg>")
    return "".join(out)
