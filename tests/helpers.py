"""Helpers shared by the tests (imported as ``tests.helpers``; fixtures live in ``tests/conftest.py``).

Models and inputs:
- ``tiny_model``: a 2-layer GPT-2 (``pipeline.tiny_lm.new_gpt2``), Llama or GPT-NeoX
  built from a config (nothing downloaded); ``TINY_PAD`` is its pad token.
- ``train_full_batch``: a few full-batch AdamW steps, so curvature is not degenerate.
- ``random_sequences`` / ``random_queries``: training- and query-style ``TokenWindow`` lists
  (batch them with ``pipeline.core.text.batches_of``).
- ``spearman``: rank correlation of two score tensors (``benchmarks.metrics.spearman``).

Environment:
- ``scratch_env``: HOME and Ray's temp dir pointed at a scratch folder (Ray 2.60
  writes ``~/.ray/auth_token``), restored afterwards.
- ``aws_env_vars``: the standard AWS variables pointed at the test S3 server.

Pipeline outputs:
- ``reference_table``: the ranked table computed by the numeric core alone, in
  one process, with the pipeline's shard layout, batching and tie-break keys.
- ``assert_same_ranking``: row-for-row comparison with a stated score tolerance.
- ``read_table`` / ``read_table_duckdb``: the attribution table through
  ``pyarrow.dataset`` and through DuckDB (over the pyarrow dataset object).

Jobs refusing bad input:
- ``job_fails``: the whole job raises a given error with a one-line message naming the input.
- ``write_jsonl``: rows as a JSONL file (rewritten only when it changes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from benchmarks import metrics
from pipeline.config import AttributeConfig
from pipeline.core.text import IGNORE, TokenWindow, batches_of, collate
from pipeline.tiny_lm import mean_token_nll, new_gpt2

# ---- tiny models and inputs ----------------------------------------------------------------

VOCAB = 48
TINY_PAD = 1  # the tiny models' pad (and end-of-text) token


def tiny_model(family: str, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """A 2-layer model of the given family with a 48-token vocabulary."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        model = new_gpt2(VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, eos_id=1, pad_id=TINY_PAD, seed=seed)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "neox":
        cfg = GPTNeoXConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **common)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def train_full_batch(model: torch.nn.Module, windows: list[TokenWindow], pad_id: int, *, steps: int) -> torch.nn.Module:
    """``steps`` full-batch AdamW steps (lr 1e-2), so gradients and curvature are not degenerate.

    Returns the model in eval mode and float64, ready for the float64 oracles.
    """
    batch = collate(windows, pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = mean_token_nll(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().to(torch.float64)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho of two score tensors of one shape, flattened.

    ``benchmarks.metrics.spearman`` (average ranks for ties, checked against
    scipy in tests/eval/test_metrics.py); it raises on non-finite scores.
    """
    return metrics.spearman(x.detach().cpu().flatten().numpy(), y.detach().cpu().flatten().numpy())


def random_sequences(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12, prefix: str = "d") -> list[TokenWindow]:
    """Training-style sequences (every token after the first is a target) of varied length."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = tuple(torch.randint(2, VOCAB, (length,), generator=gen).tolist())
        out.append(TokenWindow(f"{prefix}{i}", 0, ids, ids))
    return out


def random_queries(n: int, seed: int = 100) -> list[TokenWindow]:
    """Query-style sequences: a prompt (unlabelled) followed by a labelled completion."""
    out = []
    for s in random_sequences(n, seed=seed, min_len=5, max_len=9, prefix="q"):
        cut = len(s.input_ids) // 2
        labels = (IGNORE,) * cut + s.input_ids[cut:]
        out.append(TokenWindow(s.doc_id, 0, s.input_ids, labels))
    return out


# ---- environment and pipeline outputs ---------------------------------------------------------

# Scores of the pipeline (float32 on Ray workers, factors summed shard by shard)
# and of the one-process reference (same batches, float32) agree to this
# relative tolerance, relative to the largest |score| of the same query.
SCORE_RTOL = 1e-4

TABLE_TYPES = {
    "query_id": pa.string(),
    "polarity": pa.string(),
    "rank": pa.int32(),
    "doc_id": pa.string(),
    "window": pa.int32(),
    "score": pa.float64(),
}
DUCKDB_TYPES = {
    "query_id": "VARCHAR",
    "polarity": "VARCHAR",
    "rank": "INTEGER",
    "doc_id": "VARCHAR",
    "window": "INTEGER",
    "score": "DOUBLE",
}
KEY_COLUMNS = ("query_id", "polarity", "rank", "doc_id", "window")


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def patched_environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) environment variables; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(old)


@contextlib.contextmanager
def scratch_env(**extra: str | None) -> Iterator[str]:
    """HOME and RAY_TMPDIR in a fresh short folder under /tmp (Unix socket paths must stay short)."""
    root = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    home = os.path.join(root, "home")
    os.makedirs(home)
    try:
        with patched_environ(HOME=home, RAY_TMPDIR=root, **extra):
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def aws_env_vars(endpoint: str, scratch: str, key: str = "testing", secret: str = "testing") -> dict:
    """The AWS variables that point s3fs/pyarrow at the loopback test server (None: unset).

    No region: it makes s3fs/botocore address the bucket differently against a
    local server (bucket creation fails with us-east-1). The developer's ~/.aws
    files are never read (config and credentials point into ``scratch``).
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": None,
        "AWS_REGION": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_CONFIG_FILE": os.path.join(scratch, "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(scratch, "no-aws-credentials"),
    }


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def local_ray(num_cpus: int = 1) -> Iterator[None]:
    """A fresh local Ray of ``num_cpus`` CPUs in a scratch HOME (the jobs then join it), shut down after."""
    import ray

    with scratch_env():
        shutdown_ray()
        ray.init(num_cpus=num_cpus, include_dashboard=False)
        try:
            yield
        finally:
            shutdown_ray()


@contextlib.contextmanager
def multi_node_ray(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[object]:
    """A ``ray.cluster_utils.Cluster`` (a head without CPUs and ``nodes`` worker nodes) in a scratch HOME,
    joined by this process (the jobs then reuse it); yields the cluster, shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    with scratch_env():
        shutdown_ray()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(nodes):
                cluster.add_node(num_cpus=cpus_per_node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield cluster
        finally:
            shutdown_ray()
            cluster.shutdown()


# ---- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSplit:
    """The demo corpus cut into files; ``files`` in listing order, each a list of (id, text) rows."""

    paths: list[str]
    files: list[list[tuple[str, str]]]

    @property
    def num_docs(self) -> int:
        return sum(len(f) for f in self.files)


def split_corpus(corpus_parquet: str, out_dir: str, first_rows: int, row_group_size: int = 16) -> CorpusSplit:
    """Cut the demo corpus into ``part-00000.parquet`` (small row groups) and ``part-00001.jsonl``.

    Both readers and the row-group slicing of the shard reader are then exercised.
    """
    table = pq.read_table(corpus_parquet)
    os.makedirs(out_dir, exist_ok=True)
    head, tail = table.slice(0, first_rows), table.slice(first_rows)
    p0 = os.path.join(out_dir, "part-00000.parquet")
    pq.write_table(head, p0, row_group_size=row_group_size)
    p1 = os.path.join(out_dir, "part-00001.jsonl")
    with open(p1, "w") as f:
        for row in tail.to_pylist():
            f.write(json.dumps(row) + "\n")
    rows = lambda t: list(zip(t.column("id").to_pylist(), t.column("text").to_pylist()))  # noqa: E731
    return CorpusSplit([p0, p1], [rows(head), rows(tail)])


def read_queries_file(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the single-process reference ------------------------------------------------------------


def reference_table(
    cfg: AttributeConfig, model_dir: str, files: list[list[tuple[str, str]]], queries: list[dict], factors=None
) -> tuple[pa.Table, object]:
    """The ranked table from the numeric core alone, in this process.

    Shards are re-derived here (``docs_per_shard`` rows of one file, files in
    order), windows come from ``encode_documents``, batches have the
    pipeline's sizes within each shard, and ties are broken by
    ``seq_key(shard_index, local_index)`` as the workers do. The ranking is a
    plain full sort of every window's score. Returns the table and the fitted
    factors; pass those back as ``factors`` to score another projection with
    the same (full-size) factors without fitting again.
    """

    from pipeline.core.text import encode_query
    from pipeline.worker import seq_key

    engine, tok, shards = _reference_core(cfg, model_dir, files)
    pad = tok.pad_token_id
    if factors is None:
        factors = _reference_fit(cfg, engine, tok, shards)
    qseqs = [encode_query(tok, q["id"], q["prompt"], q["completion"], cfg.corpus.window) for q in queries]
    qids = [q["id"] for q in queries]
    grads = engine.query_gradients(batches_of(qseqs, cfg.score.batch_size, pad), factors, qids)
    scores, keys, where = [], [], []
    for index, seqs in shards:
        for i, batch in enumerate(batches_of(seqs, cfg.score.batch_size, pad)):
            scores.append(engine.score_batch(batch, grads).detach().to(torch.float64))
        keys.extend(seq_key(index, j) for j in range(len(seqs)))
        where.extend((s.doc_id, s.window) for s in seqs)
    all_scores = torch.cat(scores).numpy()  # (windows, queries)
    rows = {c: [] for c in TABLE_TYPES}
    for q, qid in enumerate(qids):
        col = all_scores[:, q]
        for polarity, sign in (("proponent", 1.0), ("opponent", -1.0)):
            order = sorted(range(len(keys)), key=lambda n: (-sign * col[n], keys[n]))
            kept = [n for n in order if sign * col[n] > 0][: cfg.score.top_k]
            for rank, n in enumerate(kept, 1):
                for c, v in zip(TABLE_TYPES, (qid, polarity, rank, where[n][0], where[n][1], float(col[n]))):
                    rows[c].append(v)
    return pa.table(rows, schema=pa.schema(list(TABLE_TYPES.items()))), factors


def reference_factors(cfg: AttributeConfig, model_dir: str, files: list[list[tuple[str, str]]]):
    """The factors `reference_table` fits (every window of ``files``, shards and batches as there)."""
    engine, tok, shards = _reference_core(cfg, model_dir, files)
    return _reference_fit(cfg, engine, tok, shards)


def _reference_core(cfg: AttributeConfig, model_dir: str, files: list[list[tuple[str, str]]]):
    """The engine, tokenizer and ``[(shard_index, windows)]`` of `reference_table`."""
    from pipeline.core.influence import InfluenceEngine
    from pipeline.core.text import encode_documents
    from pipeline.model_io import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    engine = InfluenceEngine(model, cfg.influence(), "cpu")
    shards = []  # (shard_index, windows)
    for rows in files:
        for start in range(0, len(rows), cfg.corpus.docs_per_shard):
            seqs, _ = encode_documents(tok, rows[start : start + cfg.corpus.docs_per_shard], cfg.corpus.window)
            shards.append((len(shards), seqs))
    return engine, tok, shards


def _reference_fit(cfg: AttributeConfig, engine, tok, shards):
    """One-process EK-FAC over every window of ``shards``, batched as the pipeline's shards are."""
    return engine.fit([b for _, seqs in shards for b in batches_of(seqs, cfg.factors.batch_size, tok.pad_token_id)])


# ---- reading and comparing tables ------------------------------------------------------------


def read_table(url: str, filesystem=None) -> pa.Table:
    """The attribution table via ``pyarrow.dataset`` (s3 URLs through the given fsspec filesystem)."""
    path = url
    if filesystem is not None and "://" in url:
        path = url.split("://", 1)[1]
    return ds.dataset(path, filesystem=filesystem, format="parquet").to_table()


def read_table_duckdb(url: str, filesystem=None) -> tuple[list[tuple], dict]:
    """The table through DuckDB over a pyarrow dataset: rows ordered by the key columns, column types."""
    import duckdb

    path = url.split("://", 1)[1] if filesystem is not None and "://" in url else url
    attribution = ds.dataset(path, filesystem=filesystem, format="parquet")  # noqa: F841 (DuckDB scans it by name)
    con = duckdb.connect()
    try:
        con.register("attribution", attribution)
        rel = con.sql(
            'SELECT query_id, polarity, rank, doc_id, "window", score FROM attribution '
            "ORDER BY query_id, polarity, rank"
        )
        types = dict(zip(rel.columns, [str(t) for t in rel.types]))
        return rel.fetchall(), types
    finally:
        con.close()


def sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.select(list(TABLE_TYPES)).to_pylist(), key=lambda r: (r["query_id"], r["polarity"], r["rank"]))


def assert_same_ranking(got: pa.Table, want: pa.Table, rtol: float = SCORE_RTOL) -> dict:
    """Same (query_id, polarity, rank, doc_id, window) rows; scores equal to ``rtol`` of the query's max |score|.

    The only difference tolerated is a near-tie swap, which float32 noise may
    legitimately cause: a row whose window sits elsewhere in the same
    (query_id, polarity) list of ``want`` with a score within the tolerance,
    or, at the last ranks, a window outside that list whose score ties the
    last kept one. Returns the number of rows, of near-tie swaps and the
    largest score difference relative to its query's max |score|.
    """
    g, w = sorted_rows(got), sorted_rows(want)
    scale: dict[str, float] = {}
    for r in w:
        scale[r["query_id"]] = max(scale.get(r["query_id"], 0.0), abs(r["score"]))
    assert [(r["query_id"], r["polarity"]) for r in g] == [(r["query_id"], r["polarity"]) for r in w], (
        "different numbers of rows per (query_id, polarity)"
    )
    lists: dict[tuple, dict] = {}
    last: dict[tuple, float] = {}
    for r in w:
        lists.setdefault((r["query_id"], r["polarity"]), {})[(r["doc_id"], r["window"])] = r["score"]
        last[(r["query_id"], r["polarity"])] = r["score"]
    hard, swaps, worst = [], [], 0.0
    for a, b in zip(g, w):
        tol = rtol * scale[b["query_id"]]
        worst = max(worst, abs(a["score"] - b["score"]) / scale[b["query_id"]])
        if abs(a["score"] - b["score"]) > tol:
            hard.append((a, b))
        elif (a["doc_id"], a["window"]) != (b["doc_id"], b["window"]):
            group = (a["query_id"], a["polarity"])
            elsewhere = lists[group].get((a["doc_id"], a["window"]))
            ok = abs(elsewhere - a["score"]) <= tol if elsewhere is not None else abs(a["score"] - last[group]) <= tol
            (swaps if ok else hard).append((a, b))
    assert not hard, f"{len(hard)} rows differ (rtol={rtol} of the query's max |score|): {hard[:5]}"
    return {"rows": len(w), "near_tie_swaps": len(swaps), "max_rel_score_diff": worst}


def assert_identical_tables(a: pa.Table, b: pa.Table) -> None:
    """Row for row identical, scores bit for bit."""
    ra, rb = sorted_rows(a), sorted_rows(b)
    diff = [(x, y) for x, y in zip(ra, rb) if x != y]
    assert ra == rb, f"{len(ra)} vs {len(rb)} rows, {len(diff)} differ, e.g. {diff[:3]}"


def check_table_schema(table: pa.Table) -> None:
    """The columns and types of the ranked table (docs/design.md#storage)."""
    for name, typ in TABLE_TYPES.items():
        assert name in table.schema.names, f"column {name} missing from {table.schema}"
        assert table.schema.field(name).type == typ, f"{name}: {table.schema.field(name).type} != {typ}"
    rows = table.to_pylist()
    assert rows, "empty attribution table"
    for r in rows:
        assert r["polarity"] in ("proponent", "opponent")
        assert (r["score"] > 0) == (r["polarity"] == "proponent") and r["score"] != 0
        assert r["rank"] >= 1 and r["window"] >= 0


# ---- demo quality --------------------------------------------------------------------------


def demo_recall(table: pa.Table, facts: list[dict], num_docs: int) -> dict:
    """Per fact: is the top-1 proponent document planted for it, and recall@|gold| over distinct documents."""
    props: dict[str, list[str]] = {}
    for r in sorted_rows(table):
        if r["polarity"] == "proponent":
            docs = props.setdefault(r["query_id"], [])
            if r["doc_id"] not in docs:
                docs.append(r["doc_id"])
    per_fact = {}
    for f in facts:
        gold = set(f["gold_doc_ids"])
        docs = props.get(f["fact_id"], [])
        per_fact[f["fact_id"]] = {
            "learned": bool(f["learned"]),
            "copies": len(gold),
            "top1_gold": bool(docs) and docs[0] in gold,
            "recall_at_gold": len(gold.intersection(docs[: len(gold)])) / len(gold),
            "chance": len(gold) / num_docs,
            "top_docs": docs[: len(gold) + 2],
        }
    return per_fact


# ---- jobs refusing bad input -------------------------------------------------------------------


def write_jsonl(path, rows: list) -> str:
    """``rows`` as JSON lines at ``path``; rewritten only when it changes (shard ids stay the same)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return str(path)


def job_fails(cfg: AttributeConfig, error: type, *names: str) -> str:
    """Run the whole job; it must raise ``error`` with a one-line message naming every one of ``names``."""
    import pytest

    from pipeline.run import run_attribution

    with pytest.raises(error) as e:
        run_attribution(cfg)
    message = str(e.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return message
