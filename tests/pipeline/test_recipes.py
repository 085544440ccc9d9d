"""Every SQL recipe of docs/recipes.md, run by DuckDB on two real demo runs, returns the rows computed here by hand.

The SQL is read from the docs page itself (blocks starting ``-- recipe: name``),
so the page cannot drift from what is tested.
"""

from __future__ import annotations

import math
import os
import re

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.pipeline.demo_runs import DAMPED, UNCUT, demo_runs

pytestmark = pytest.mark.integration

RECIPES_PAGE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "recipes.md")


def recipes() -> dict[str, str]:
    text = open(RECIPES_PAGE).read()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    out = {}
    for block in blocks:
        name = re.match(r"-- recipe: (\w+)\n", block)
        assert name, f"a SQL block of docs/recipes.md has no '-- recipe: name' line: {block[:80]!r}"
        out[name.group(1)] = block
    return out


@pytest.fixture(scope="module")
def runs(small_demo, shared_tmp):
    return demo_runs(small_demo, shared_tmp)


@pytest.fixture(scope="module")
def con(runs):
    """DuckDB with the page's views, opened from storage.root as the page says."""
    here = os.getcwd()
    os.chdir(runs.root)
    try:
        con = duckdb.connect()
        con.execute(recipes()["views"])
        # Views resolve their globs when queried: materialise them while in storage.root.
        for table in ("attribution", "documents", "queries", "tokens", "layers"):
            con.execute(f"CREATE TABLE t_{table} AS SELECT * FROM {table}")
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM t_{table}")
        yield con
    finally:
        os.chdir(here)


def run(con, name: str, **params) -> list[dict]:
    rel = con.execute(recipes()[name], params)
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, row)) for row in rel.fetchall()]


def table(runs, run_id: str, name: str) -> list[dict]:
    return pq.read_table(os.path.join(runs.root, "runs", run_id, name, "part-00000.parquet")).to_pylist()


def test_every_recipe_is_tested():
    assert set(recipes()) == {
        "views", "top_proponents", "documents_for_many_queries", "top10_changes", "top_1pct_share",
        "window_tokens", "window_layers",
    }


def test_top_proponents_with_text(con, runs):
    query = runs.xss_query
    got = run(con, "top_proponents", run=UNCUT, query=query)
    want = [r for r in table(runs, UNCUT, "attribution") if r["query_id"] == query and r["polarity"] == "proponent"]
    want = sorted(want, key=lambda r: r["rank"])[:10]
    assert len(got) == 10
    assert [(g["rank"], g["doc_id"], g["window"], g["score"], g["text"]) for g in got] == [
        (w["rank"], w["doc_id"], w["window"], w["score"], w["text"]) for w in want
    ]
    prompt = next(q["prompt"] for q in runs.queries if q["id"] == query)
    assert {g["prompt"] for g in got} == {prompt}
    assert all(g["text"] for g in got)


def test_documents_in_the_top_10_of_many_queries(con, runs):
    got = run(con, "documents_for_many_queries", run=UNCUT, min_queries=2)
    per_doc: dict = {}
    for r in table(runs, UNCUT, "documents"):
        if r["polarity"] == "proponent" and r["rank"] <= 10:
            queries, total = per_doc.get(r["doc_id"], (set(), 0.0))
            per_doc[r["doc_id"]] = (queries | {r["query_id"]}, total + r["score"])
    want = sorted(
        ((d, len(q), t) for d, (q, t) in per_doc.items() if len(q) >= 2), key=lambda x: (-x[1], -x[2], x[0])
    )
    assert want, "no document is in the top 10 of two queries: the recipe is not exercised"
    assert [(g["doc_id"], g["num_queries"]) for g in got] == [(d, n) for d, n, _ in want]
    for g, (_, _, total) in zip(got, want):
        assert g["total_score"] == pytest.approx(total, rel=1e-12)


def test_what_entered_or_left_the_top_10_between_two_runs(con, runs):
    changed = 0
    for q in (q["id"] for q in runs.queries):
        def top(run_id):
            return {
                (r["doc_id"], r["window"]): r["rank"]
                for r in table(runs, run_id, "attribution")
                if r["query_id"] == q and r["polarity"] == "proponent" and r["rank"] <= 10
            }

        a, b = top(UNCUT), top(DAMPED)
        want = sorted(
            [("entered", d, w, None, rank) for (d, w), rank in b.items() if (d, w) not in a]
            + [("left", d, w, rank, None) for (d, w), rank in a.items() if (d, w) not in b],
            key=lambda x: (x[0], x[4] if x[4] is not None else x[3]),
        )
        got = run(con, "top10_changes", run_a=UNCUT, run_b=DAMPED, query=q)
        assert [(g["change"], g["doc_id"], g["window"], g["rank_a"], g["rank_b"]) for g in got] == want, q
        changed += bool(want)
    assert changed, "the two runs have the same top 10 for every query: the recipe is not exercised"


def test_score_share_of_the_top_percent_of_documents(con, runs):
    got = {g["query_id"]: g for g in run(con, "top_1pct_share", run=UNCUT)}
    docs = table(runs, UNCUT, "documents")
    for q in {r["query_id"] for r in docs}:
        scores = sorted((r["score"] for r in docs if r["query_id"] == q and r["polarity"] == "proponent"), reverse=True)
        top = max(1, math.ceil(len(scores) / 100))
        assert got[q]["num_documents"] == len(scores)
        assert got[q]["top_1pct_share"] == pytest.approx(sum(scores[:top]) / sum(scores), rel=1e-12)
        assert 0 < got[q]["top_1pct_share"] <= 1


def test_a_top_windows_tokens_and_layers(con, runs):
    query = runs.xss_query
    window = next(r for r in table(runs, UNCUT, "attribution")
                  if (r["query_id"], r["polarity"], r["rank"]) == (query, "proponent", 1))
    tokens = run(con, "window_tokens", run=UNCUT, query=query)
    layers = run(con, "window_layers", run=UNCUT, query=query)
    assert [t["position"] for t in tokens] == list(range(len(tokens))) and len(tokens) >= 2
    assert sum(t["score"] for t in tokens) == pytest.approx(window["score"], rel=1e-4)
    assert [x["layer_index"] for x in layers] == list(range(len(layers))) and len(layers) >= 1
    assert sum(x["score"] for x in layers) == pytest.approx(window["score"], rel=1e-4)
