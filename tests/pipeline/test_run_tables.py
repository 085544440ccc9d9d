"""The run tables (pipeline.tables) on two real demo runs: contents, provenance, history, bad input.

Checked: one glob per table reads both runs (both run ids, one schema); every
file's metadata names its run and factors; the ranked table keeps the
contract columns; a window's text and span match the document; document
scores equal the sums of window scores on an uncut run; token shares and
layer shares add up to the window's score; queries carry log p; a window that
starts inside a multi-byte character and one holding a special token are
decoded (U+FFFD, ``<|endoftext|>``). Tests on the runs are integration tests;
row groups that never split a query and an empty run that still writes every
table and its report are unit tests.
"""

from __future__ import annotations

import math
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.tables import (
    ATTRIBUTION,
    DOCUMENTS,
    QUERIES,
    SCHEMAS,
    TABLES,
    TOKENS,
    RunMetadata,
    parquet_bytes,
    row_group_bounds,
)
from tests.pipeline.demo_runs import DAMPED, EMOJI_ID, SPECIAL_ID, UNCUT, UNCUT_TOP_K, XSS_ID, demo_runs

CONTRACT = ["query_id", "polarity", "rank", "doc_id", "window", "score"]


@pytest.fixture(scope="module")
def runs(small_demo, shared_tmp):
    return demo_runs(small_demo, shared_tmp)


def glob(runs, table: str) -> str:
    return os.path.join(runs.root, "runs", "*", table, "*.parquet")


def rows(runs, table: str, run_id: str) -> list[dict]:
    return duckdb.sql(f"SELECT * FROM read_parquet('{glob(runs, table)}') WHERE run_id = '{run_id}'").to_arrow_table().to_pylist()


@pytest.mark.integration
def test_one_glob_per_table_reads_both_runs_with_one_schema(runs):
    for table in TABLES:
        ids = duckdb.sql(f"SELECT DISTINCT run_id FROM read_parquet('{glob(runs, table)}') ORDER BY 1").fetchall()
        assert ids == [(DAMPED,), (UNCUT,)], table
        schemas = [pq.read_schema(os.path.join(runs.root, "runs", r, table, "part-00000.parquet")) for r in (UNCUT, DAMPED)]
        assert schemas[0].remove_metadata() == schemas[1].remove_metadata() == SCHEMAS[table], table
    assert pq.read_schema(os.path.join(runs.root, "runs", UNCUT, ATTRIBUTION, "part-00000.parquet")).names[:6] == CONTRACT


@pytest.mark.integration
def test_every_file_names_its_run_factors_and_config(runs):
    for run_id in (UNCUT, DAMPED):
        manifest = runs.manifests[run_id]
        for table in TABLES:
            path = os.path.join(runs.root, "runs", run_id, table, "part-00000.parquet")
            meta = RunMetadata.from_parquet(pq.read_schema(path).metadata)
            assert meta["run_id"] == run_id and meta["table"] == table
            assert meta["factors_id"] == manifest["factors_id"] and meta["queries_id"] == manifest["queries_id"]
            assert meta["model_fingerprint"] == manifest["model"]["fingerprint"]
            assert len(meta["config_digest"]) == 20 and meta["char_spans"] == "offsets"
            f = pq.ParquetFile(path)
            column = f.metadata.row_group(0).column(0)
            assert column.path_in_schema == "query_id" and column.statistics.has_min_max
            assert column.has_column_index and column.has_offset_index


@pytest.mark.integration
def test_windows_carry_their_text_and_span(runs):
    eos = "<|endoftext|>"
    checked = 0
    for r in rows(runs, ATTRIBUTION, UNCUT):
        doc = runs.corpus[r["doc_id"]]
        if doc.isascii() and eos not in doc:
            piece = doc[r["char_start"] : r["char_end"]]
            assert r["text"] in (piece, piece + eos), r
            checked += 1
    assert checked > 100


@pytest.mark.integration
def test_documents_are_the_sums_of_their_windows_on_an_uncut_run(runs):
    manifest = runs.manifests[UNCUT]
    assert manifest["counts"]["num_windows"] < UNCUT_TOP_K
    sums = duckdb.sql(
        f"SELECT query_id, doc_id, sum(score) AS s, count(*) AS n FROM read_parquet('{glob(runs, ATTRIBUTION)}') "
        f"WHERE run_id = '{UNCUT}' GROUP BY ALL"
    ).fetchall()
    want = {(q, d): (s, n) for q, d, s, n in sums}
    docs = rows(runs, DOCUMENTS, UNCUT)
    got = {(r["query_id"], r["doc_id"]): r for r in docs}
    nonzero = {k for k, (s, _) in want.items() if s != 0}
    assert set(got) == nonzero
    for key, r in got.items():
        s, n = want[key]
        assert r["score"] == pytest.approx(s, rel=1e-9, abs=1e-12)
        assert (r["polarity"] == "proponent") == (s > 0)
        assert r["num_windows"] >= n  # windows with a zero score are not in the ranked table
    for q in {r["query_id"] for r in docs}:
        props = sorted((r for r in docs if r["query_id"] == q and r["polarity"] == "proponent"), key=lambda r: r["rank"])
        assert [r["rank"] for r in props] == list(range(1, len(props) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(props, props[1:]))


@pytest.mark.integration
def test_token_and_layer_shares_add_up_to_the_window_score(runs):
    for run_id in (UNCUT, DAMPED):
        windows = {(r["query_id"], r["polarity"], r["rank"]): r for r in rows(runs, ATTRIBUTION, run_id)}
        for table in ("tokens", "layers"):
            sums: dict = {}
            for r in rows(runs, table, run_id):
                key = (r["query_id"], r["polarity"], r["rank"])
                assert (r["doc_id"], r["window"]) == (windows[key]["doc_id"], windows[key]["window"])
                sums[key] = sums.get(key, 0.0) + r["score"]
            top = {k for k in windows if k[2] <= 5}
            assert set(sums) == top, table
            for key, s in sums.items():
                assert s == pytest.approx(windows[key]["score"], rel=1e-4), (table, key)
    tokens = rows(runs, TOKENS, UNCUT)
    first = [t for t in tokens if (t["query_id"], t["polarity"], t["rank"]) == (tokens[0]["query_id"], "proponent", 1)]
    assert [t["position"] for t in first] == list(range(len(first)))
    assert "".join(t["token_text"] for t in first if not t["special"]) in runs.corpus[first[0]["doc_id"]]


@pytest.mark.integration
def test_queries_table_holds_prompt_completion_and_log_prob(runs):
    got = {r["query_id"]: r for r in rows(runs, QUERIES, UNCUT)}
    assert set(got) == {q["id"] for q in runs.queries}
    for q in runs.queries:
        r = got[q["id"]]
        assert (r["prompt"], r["completion"]) == (q["prompt"], q["completion"])
        assert r["log_prob"] < 0 and math.isfinite(r["log_prob"]) and r["num_completion_tokens"] >= 1


@pytest.mark.integration
def test_awkward_documents_are_decoded_and_shown(runs):
    by_doc: dict = {}
    for r in rows(runs, ATTRIBUTION, UNCUT):
        by_doc.setdefault((r["doc_id"], r["window"]), r)
    # Window 1 of the emoji document starts at token 63 of 4-byte characters: inside one.
    emoji = by_doc[(EMOJI_ID, 1)]
    assert emoji["text"].startswith("\ufffd") and "\U0001F600" in emoji["text"]
    assert emoji["char_start"] is not None and emoji["char_end"] > emoji["char_start"]
    assert "<|endoftext|>" in by_doc[(SPECIAL_ID, 0)]["text"]
    assert by_doc[(XSS_ID, 0)]["text"].startswith("<script>")


def test_row_groups_hold_whole_queries():
    ids = ["a"] * 3 + ["b"] * 4 + ["c"] * 2 + ["d"] * 9
    assert row_group_bounds(ids, limit=7) == [(0, 7), (7, 9), (9, 16), (16, 18)]
    assert row_group_bounds([], limit=7) == [(0, 0)]
    table = pa.table({"query_id": ids})
    meta = RunMetadata("r", "m", "f", "q", "c")
    f = pq.ParquetFile(pa.BufferReader(parquet_bytes(table, meta, "attribution", limit=7)))
    groups = [f.read_row_group(g).column("query_id").to_pylist() for g in range(f.num_row_groups)]
    assert groups == [ids[0:7], ids[7:9], ids[9:16], ids[16:18]]


def test_an_empty_run_still_writes_every_table_and_the_report(tmp_path):
    from pipeline import layout
    from pipeline.report import write_report
    from pipeline.storage import Storage
    from pipeline.tables import queries_table, write_run_tables

    storage = Storage(str(tmp_path))
    meta = RunMetadata("empty", "m", "f", "q", "c")
    windows = write_run_tables(storage, "empty", {}, 10, queries_table([], []), meta, 5)
    assert windows.num_rows == 0
    for table in TABLES:
        got = pq.read_table(layout.run_table_part(storage.root, "empty", table))
        assert got.num_rows == 0 and got.schema.remove_metadata() == SCHEMAS[table]
    html = open(write_report(storage, "empty")).read()
    assert "no queries and no ranked rows" in html


def test_kept_breakdowns_hold_exactly_the_final_top_rows():
    """The scoring pass keeps a window's shares while it is in some query's top rows; at the end, exactly those."""
    import torch

    from pipeline.core.topk import TopK
    from pipeline.shard_result import KeptBreakdowns, ranked

    gen = torch.Generator().manual_seed(3)
    n, queries, layers, tokens, limit = 40, 3, 4, 5, 2
    scores = torch.randn(n, queries, generator=gen, dtype=torch.float64)
    per_layer = torch.randn(n, queries, layers, generator=gen, dtype=torch.float64)
    per_token = torch.randn(n, queries, tokens, generator=gen, dtype=torch.float64)
    acc, kept = TopK(queries, 10), KeptBreakdowns(limit)
    for start in range(0, n, 6):
        end = min(n, start + 6)
        acc.update(scores[start:end], torch.arange(start, end, dtype=torch.int64))
        kept.update(acc, range(start, end), per_layer[start:end], per_token[start:end])
        assert len(kept.shares) <= 2 * queries * limit
    final = {(key & 0xFFFFFFFF, q) for q in range(queries) for *_, key in ranked(acc, q, limit)}
    assert set(kept.shares) == final and len(final) >= queries
    for (local, q), (layer_shares, token_shares) in kept.shares.items():
        assert torch.equal(layer_shares, per_layer[local, q]) and torch.equal(token_shares, per_token[local, q])
