"""The terminal view of a run: a query's top rows with their tokens coloured by contribution (ANSI).

``format_query(storage, run_id, query_id, ...)`` reads the run's tables
(`pipeline.tables`) and returns the text ``jobs/show.py`` prints: the prompt
and completion with ``log p``, then each of the top rows with its document,
window, score and text; rows that have token scores (the top
``TOKEN_ROWS`` of each polarity) show each token on a background from green
(raises the completion's log-probability) to red (lowers it), with the
strongest layers. Special tokens are underlined; U+FFFD (a token boundary
inside a multi-byte character) is shown as it is. Control characters of the
data are escaped so a document cannot drive the terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, RunConfig, StorageConfig
from pipeline.layout import validate_name
from pipeline.tables import ATTRIBUTION, LAYERS, QUERIES, TOKENS

POLARITIES = ("proponent", "opponent")
RESET = "\x1b[0m"
# Background shades, weakest to strongest (256-colour palette).
GREENS = (194, 157, 120, 83, 46)
REDS = (224, 217, 210, 203, 196)


@dataclass
class ShowOptions:
    # Top rows shown per polarity.
    rows: int = 5
    # proponent, opponent, or both.
    polarity: str = "both"
    # false: plain text (no ANSI colours), e.g. for a log file.
    color: bool = True
    # Characters of a row's text shown when it has no token scores.
    width: int = 300


@dataclass
class ShowConfig:
    """``python jobs/show.py run.id=... query=...``: the storage, the run and the query to show."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # The query's id (see the run's queries table).
    query: str = ""
    show: ShowOptions = field(default_factory=ShowOptions)

    def validate(self) -> None:
        validate_name(self.run.id, "run.id")
        if not self.query:
            raise ConfigError("query is empty; give the query's id, e.g. query=fact-00")
        if self.show.polarity not in (*POLARITIES, "both"):
            raise ConfigError(f"show.polarity={self.show.polarity!r}; use proponent, opponent or both")
        if self.show.rows < 1:
            raise ConfigError(f"show.rows must be >= 1, got {self.show.rows}")


def register_configs() -> None:
    """Register the terminal view's schema (conf/show.yaml is validated against it)."""
    from pipeline.config import store_schema

    store_schema("show_schema", ShowConfig, mandatory=("storage.root",))


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escapes included) shown as ``\\xNN``; newlines as ``⏎``."""
    out = []
    for c in text:
        if c == "\n":
            out.append("\u23ce")
        elif c == "\t":
            out.append(" ")
        elif ord(c) < 32 or 127 <= ord(c) < 160:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def _shade(share: float, scale: float, color: bool, special: bool, text: str) -> str:
    if not color:
        return text
    palette = GREENS if share >= 0 else REDS
    level = min(len(palette) - 1, int(abs(share) / scale * len(palette))) if scale else 0
    underline = "\x1b[4m" if special else ""
    return f"\x1b[48;5;{palette[level]}m\x1b[38;5;16m{underline}{text}{RESET}"


def format_query(storage, run_id: str, query_id: str, options: ShowOptions = ShowOptions()) -> str:
    """The query's header and top rows, as lines of text (ANSI colours when ``options.color``)."""
    import duckdb

    from pipeline import layout
    from pipeline.report import read_run

    tables, _, meta = read_run(storage, run_id)
    con = duckdb.connect()
    try:
        for name in (ATTRIBUTION, QUERIES, TOKENS, LAYERS):
            con.register(name, tables[name])

        def rows(sql: str, *params) -> list[dict]:
            rel = con.execute(sql, list(params))
            cols = [d[0] for d in rel.description]
            return [dict(zip(cols, r)) for r in rel.fetchall()]

        queries = rows(f"SELECT * FROM {QUERIES} WHERE query_id = ?", query_id)
        ranked = rows(f"SELECT * FROM {ATTRIBUTION} WHERE query_id = ? AND rank <= ? ORDER BY polarity DESC, rank",
                      query_id, options.rows)
        tokens = rows(f"SELECT * FROM {TOKENS} WHERE query_id = ? ORDER BY polarity, rank, position", query_id)
        layers = rows(f"SELECT * FROM {LAYERS} WHERE query_id = ? ORDER BY polarity, rank, layer_index", query_id)
        known = [r["query_id"] for r in rows(f"SELECT query_id FROM {QUERIES} ORDER BY 1")]
    finally:
        con.close()
    if not queries and not ranked:
        if not tables[QUERIES].num_rows and not tables[ATTRIBUTION].num_rows:
            return f"run {run_id!r}: no tables under {layout.run_dir(storage.root, run_id)} (or an empty run)"
        return f"run {run_id!r} has no query {query_id!r}; its queries: {', '.join(known[:20])}"
    lines = [f"run {run_id}  query {query_id}  (factors {meta.get('factors_id', '?')})"]
    for q in queries:
        completion = printable(q["completion"])
        if options.color:
            completion = f"\x1b[1;43m{completion}{RESET}"
        lines.append(f"  {printable(q['prompt'])}{completion}")
        lines.append(f"  log p(completion | prompt) = {q['log_prob']:+.4g} over {q['num_completion_tokens']} tokens")
    for polarity in POLARITIES:
        if options.polarity not in (polarity, "both"):
            continue
        mine = [r for r in ranked if r["polarity"] == polarity]
        lines.append(f"\n{polarity}s ({len(mine)} shown)")
        for r in mine:
            lines.extend(_row_lines(r, tokens, layers, options))
    return "\n".join(lines)


def _row_lines(r: dict, tokens: list[dict], layers: list[dict], options: ShowOptions) -> list[str]:
    key = (r["polarity"], r["rank"])
    toks = [t for t in tokens if (t["polarity"], t["rank"]) == key]
    span = "" if r["char_start"] is None else f" chars {r['char_start']}-{r['char_end']}"
    head = f"  {r['rank']:>3}. {printable(r['doc_id'])}  window {r['window']}{span}  score {r['score']:+.4g}"
    if not toks:
        return [head, "       " + printable((r["text"] or "")[: options.width])]
    scale = max(abs(t["score"]) for t in toks) or 1.0
    body = "".join(_shade(t["score"], scale, options.color, t["special"], printable(t["token_text"] or ""))
                   for t in toks)
    top = sorted((x for x in layers if (x["polarity"], x["rank"]) == key), key=lambda x: -abs(x["score"]))[:3]
    strongest = ", ".join(f"{x['layer']} {x['score']:+.3g}" for x in top)
    return [head, "       " + body] + ([f"       layers: {strongest}"] if strongest else [])
