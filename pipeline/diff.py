"""Two runs compared: per query and polarity, the rows that entered, left or moved in the top-k (``jobs/diff.py``).

A row is a window ``(doc_id, window)`` of the ranked table. ``entered``: in
run B's top-k, not in A's; ``left``: in A's, not in B's; ``moved``: in both at
another rank. Unchanged rows are not listed. The table is written to
``{root}/diffs/{run_a}__vs__{run_b}.parquet`` (`DIFF_SCHEMA`). Runs scored for
different query sets (another queries file content) cannot be compared row by
row: that is a `BadInputError` naming both fingerprints.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout
from pipeline.config import ConfigError, StorageConfig
from pipeline.errors import BadInputError

ENTERED, LEFT, MOVED = "entered", "left", "moved"

DIFF_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("polarity", pa.string()),
        ("doc_id", pa.string()),
        ("window", pa.int32()),
        ("change", pa.string()),  # entered | left | moved
        ("rank_a", pa.int32()),  # null when entered
        ("rank_b", pa.int32()),  # null when left
        ("score_a", pa.float64()),
        ("score_b", pa.float64()),
    ]
)


@dataclass
class DiffOptions:
    # The earlier and the later run's ids.
    run_a: str = ""
    run_b: str = ""


@dataclass
class DiffConfig:
    """``python jobs/diff.py diff.run_a=... diff.run_b=...``."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    diff: DiffOptions = field(default_factory=DiffOptions)

    def validate(self) -> None:
        layout.validate_name(self.diff.run_a, "diff.run_a")
        layout.validate_name(self.diff.run_b, "diff.run_b")
        if self.diff.run_a == self.diff.run_b:
            raise ConfigError(f"diff.run_a and diff.run_b are both {self.diff.run_a!r}; give two runs")


def register_configs() -> None:
    from pipeline.config import store_schema

    store_schema("diff_schema", DiffConfig, mandatory=("storage.root",))


def _manifest(storage, run_id: str, key: str) -> dict:
    try:
        return storage.read_json(layout.run_manifest(storage.root, run_id))
    except FileNotFoundError:
        raise BadInputError(f"{key}={run_id!r}: no merged run under {storage.root}/runs (no manifest.json)") from None


def _ranked(storage, run_id: str) -> dict[tuple, dict[tuple, tuple[int, float]]]:
    """``{(query_id, polarity): {(doc_id, window): (rank, score)}}`` of a run's ranked table."""
    url = layout.attribution_dir(storage.root, run_id)
    table = storage.read_parquet_dir(url, columns=["query_id", "polarity", "rank", "doc_id", "window", "score"])
    out: dict[tuple, dict] = {}
    for r in table.to_pylist():
        out.setdefault((r["query_id"], r["polarity"]), {})[(r["doc_id"], r["window"])] = (r["rank"], r["score"])
    return out


def diff_runs(storage, run_a: str, run_b: str) -> pa.Table:
    """The rows that entered, left or moved from run ``run_a`` to run ``run_b`` (`DIFF_SCHEMA`)."""
    ma, mb = _manifest(storage, run_a, "diff.run_a"), _manifest(storage, run_b, "diff.run_b")
    fa, fb = ma["queries"]["fingerprint"], mb["queries"]["fingerprint"]
    if fa != fb:
        raise BadInputError(
            f"runs {run_a!r} and {run_b!r} were scored for different query sets (queries fingerprint "
            f"{fa[:12]} vs {fb[:12]}); a diff compares two runs of the same queries"
        )
    a, b = _ranked(storage, run_a), _ranked(storage, run_b)
    rows = []
    for group in sorted(set(a) | set(b), key=lambda g: (g[0], g[1] != "proponent")):
        ra, rb = a.get(group, {}), b.get(group, {})
        for where in set(ra) | set(rb):
            (rank_a, score_a), (rank_b, score_b) = ra.get(where, (None, None)), rb.get(where, (None, None))
            if rank_a == rank_b:
                continue
            change = ENTERED if rank_a is None else LEFT if rank_b is None else MOVED
            rows.append({"query_id": group[0], "polarity": group[1], "doc_id": where[0], "window": where[1],
                         "change": change, "rank_a": rank_a, "rank_b": rank_b, "score_a": score_a,
                         "score_b": score_b})
    rows.sort(key=lambda r: (r["query_id"], r["polarity"] != "proponent", r["rank_b"] or r["rank_a"],
                             r["change"]))
    return pa.Table.from_pylist(rows, schema=DIFF_SCHEMA)


def write_diff(storage, run_a: str, run_b: str, table: pa.Table) -> str:
    url = layout.run_diff(storage.root, run_a, run_b)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(url, sink.getvalue())
    return url


def summary(run_a: str, run_b: str, table: pa.Table, url: str, lines: int = 10) -> str:
    """Counts per change, the queries touched, and the first ``lines`` rows."""
    rows = table.to_pylist()
    counts = Counter(r["change"] for r in rows)
    queries = {r["query_id"] for r in rows}
    out = [f"{run_a} -> {run_b}: {counts[ENTERED]} entered, {counts[LEFT]} left, {counts[MOVED]} moved "
           f"in {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}; table: {url}"]
    for r in rows[:lines]:
        rank = lambda v: "-" if v is None else str(v)  # noqa: E731
        out.append(f"  {r['query_id']:<16} {r['polarity']:<10} {r['change']:<8} rank {rank(r['rank_a']):>3} -> "
                   f"{rank(r['rank_b']):<3} {r['doc_id']}#{r['window']}")
    if len(rows) > lines:
        out.append(f"  ... {len(rows) - lines} more rows")
    return "\n".join(out)
