"""Two real runs of the pipeline on the small demo, shared by the run-table, recipe and report tests.

The corpus is the demo's plus a JSONL file of awkward documents: one with
``<script>`` tags in front of a planted fact's text (so it ranks high for
that fact), one of emoji long enough that a window starts inside a 4-byte
character, one holding the tokenizer's ``<|endoftext|>`` in its text.

- run ``uncut``: ``score.top_k`` above the number of windows, so its tables
  hold every nonzero score (document scores can be checked against sums);
- run ``damped``: top 10 only, with much stronger damping, so rankings move.

Built once per pytest run (local Ray, local storage, one worker) by the first
process that asks, in the run's shared folder (``shared_tmp``) under a file
lock; the other processes (pytest-xdist workers) wait for it and read the
record it leaves (``runs.json``). The runs' storage is read, never written, by
the tests.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
from filelock import FileLock

from tests.helpers import scratch_env, shutdown_ray

UNCUT, DAMPED = "uncut", "damped"
UNCUT_TOP_K = 5000
XSS_ID, EMOJI_ID, SPECIAL_ID = "xss-doc", "emoji-doc", "special-doc"
XSS_PREFIX = "<script>document.title='pwned'</script><script>alert(1)</script> "


@dataclass(frozen=True)
class DemoRuns:
    root: str  # storage.root
    corpus: dict[str, str]  # doc id -> text
    queries: list[dict]
    xss_query: str  # the query whose planted fact the <script> document copies
    manifests: dict[str, dict]


_CACHE: dict[str, DemoRuns] = {}


def demo_runs(small_demo, shared_tmp: Path) -> DemoRuns:
    """The two runs: built in ``shared_tmp`` by the first process of the run to ask, read by the others."""
    if "runs" not in _CACHE:
        work = shared_tmp / "demo-runs"
        record = work / "runs.json"
        with FileLock(str(shared_tmp / "demo-runs.lock")):
            if not record.exists():
                if work.exists():  # a build that failed part-way in another process: start again
                    shutil.rmtree(work)
                runs = _build(small_demo, str(work))
                tmp = record.with_suffix(".tmp")
                tmp.write_text(json.dumps(asdict(runs)))
                os.replace(tmp, record)  # written last: its presence means both runs finished
            _CACHE["runs"] = DemoRuns(**json.loads(record.read_text()))
    return _CACHE["runs"]


def _build(small_demo, work: str) -> DemoRuns:
    from pipeline.config import (
        AttributeConfig,
        ClusterConfig,
        CorpusConfig,
        FactorsConfig,
        ModelConfig,
        QueriesConfig,
        RunConfig,
        ScoreConfig,
        StorageConfig,
    )
    from pipeline.run import run_attribution

    corpus_dir = os.path.join(work, "corpus")
    os.makedirs(corpus_dir)
    shutil.copy(small_demo.corpus_path, os.path.join(corpus_dir, "part-00000.parquet"))
    rows = pq.read_table(small_demo.corpus_path).to_pylist()
    queries = [json.loads(line) for line in open(small_demo.queries_path) if line.strip()]
    planted = {r["is_planted_for"]: r["text"] for r in rows if r.get("is_planted_for")}
    xss_query = next(q["id"] for q in queries if q["id"] in planted)
    extra = [
        {"id": XSS_ID, "text": XSS_PREFIX + planted[xss_query]},
        {"id": EMOJI_ID, "text": "\U0001F600" * 40 + " caf\u00e9 \u4e2d\u6587 " + "\U0001F680" * 30},
        {"id": SPECIAL_ID, "text": "The end of one text<|endoftext|>and the start of another one. " * 3},
    ]
    with open(os.path.join(corpus_dir, "part-00001.jsonl"), "w") as f:
        for row in extra:
            f.write(json.dumps(row) + "\n")
    corpus = {r["id"]: r["text"] for r in rows + extra}
    root = os.path.join(work, "storage")
    manifests = {}
    with scratch_env():
        for run_id, top_k, damping in ((UNCUT, UNCUT_TOP_K, 1e-3), (DAMPED, 10, 10.0)):
            cfg = AttributeConfig(
                model=ModelConfig(path=small_demo.model_dir, cache_dir=os.path.join(work, "model-cache")),
                corpus=CorpusConfig(path=corpus_dir, docs_per_shard=40, window=64),  # the demo model's window
                queries=QueriesConfig(path=small_demo.queries_path),
                storage=StorageConfig(root=root),
                run=RunConfig(id=run_id),
                factors=FactorsConfig(damping=damping, empirical_fisher=True),
                score=ScoreConfig(top_k=top_k),
                cluster=ClusterConfig(num_workers=1, cpus_per_worker=1, local_num_cpus=2),
            )
            try:
                manifests[run_id] = run_attribution(cfg)
            finally:
                shutdown_ray()
    return DemoRuns(root, corpus, queries, xss_query, manifests)
