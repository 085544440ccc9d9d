"""The README's commands are the ones CI and users run, and its sample output is what the main job prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import scratch_env

ROOT = Path(__file__).resolve().parents[2]


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    assert command in readme_blocks(), "README's test command and .ci/run differ"
    assert 'pip install -q "torch==2.13.0" -e' in command  # torch in the same pip call: no CUDA wheels


def test_readme_main_command_is_the_install_then_the_main_job_without_overrides():
    assert any(b.endswith(" && python jobs/attribute.py") and '"torch==2.13.0" -e .' in b for b in readme_blocks())


@pytest.mark.integration
def test_readme_own_data_command_runs_and_prints_the_summary(tmp_path, small_demo):
    """The README's own-data command, for real: its paths replaced by the small demo's, in a fresh folder.

    ``python jobs/attribute.py model=hf model.path=... corpus.path=... queries.path=... run.id=...``
    runs every stage on a local Ray cluster, exits 0 and prints where the
    table is and each query's top proponents.
    """
    from pipeline import layout
    from pipeline.config import AttributeConfig

    (block,) = [b for b in readme_blocks() if b.startswith("python jobs/attribute.py model=hf")]
    paths = {"model.path": small_demo.model_dir, "corpus.path": small_demo.corpus_path,
             "queries.path": small_demo.queries_path}
    args = block.replace("\\\n", " ").split()[2:]
    args = [f"{a.split('=')[0]}={paths[a.split('=')[0]]}" if a.split("=")[0] in paths else a for a in args]
    run_id = dict(a.split("=", 1) for a in args)["run.id"]
    with scratch_env():
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "attribute.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    cfg = AttributeConfig()
    queries = [json.loads(line)["id"] for line in Path(small_demo.queries_path).read_text().splitlines()]
    printed = done.stdout.splitlines()
    table = layout.attribution_dir(cfg.storage.root, run_id)
    (header,) = [line for line in printed if line.startswith("attribution table: ")]
    rows = int(re.search(r"\((\d+) rows\)$", header).group(1))
    assert header.split("  (")[0].endswith(table) and 0 < rows <= len(queries) * 2 * cfg.score.top_k, header
    for query_id in queries:
        shown = [line for line in _lines_of(printed, query_id) if line.startswith("  ")]
        assert len(shown) == cfg.demo.show, (query_id, shown)
        assert all(re.match(r"^ +\d+\. \S+ +window \d+ +score [+-]", line) for line in shown), shown


def test_readme_demo_output_is_what_the_main_job_prints(tmp_path):
    """The README's sample (abridged) is format_summary's output for the demo's defaults.

    The sample's rows are written as the job's ranked table (padded to the
    demo's queries x polarities x ``score.top_k`` rows) under the default
    ``storage.root`` and ``run.id``; every line of the sample must then be a
    line that the main job prints (up to the sample's ``...`` abridgement).
    """
    from pipeline import layout
    from pipeline.config import AttributeConfig
    from pipeline.demo import DemoSpec
    from pipeline.storage import Storage
    from pipeline.summary import format_summary

    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"```\n(attribution table:.*?)\n```", readme, re.S).group(1).splitlines()
    row = re.compile(r"^ +(\d+)\. (\S+) +window (\d+) +score ([+-][\d.e+]+)  (.*)$")
    cfg = AttributeConfig()
    rows, texts, query = [], {}, None
    body = sample[2:]  # after the table's and the report's lines
    for line in body:
        if (m := re.match(r"^query (\S+): top proponents$", line)):
            query = m.group(1)
        else:
            rank, doc_id, window, score, text = row.match(line).groups()
            texts[doc_id] = text.removesuffix(" ...")
            rows.append((query, "proponent", int(rank), doc_id, int(window), float(score)))
    facts = [f"fact-{i:02d}" for i in range(DemoSpec().n_facts)]
    shown = {(r[0], r[1], r[2]) for r in rows}
    rows += [(q, p, k, "doc-filler", 0, 0.0) for q in facts for p in ("proponent", "opponent")
             for k in range(1, cfg.score.top_k + 1) if (q, p, k) not in shown]

    root = str(tmp_path / cfg.storage.root)
    table_dir = Path(layout.attribution_dir(root, cfg.run.id))
    table_dir.mkdir(parents=True)
    columns = ["query_id", "polarity", "rank", "doc_id", "window", "score"]
    pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}),
                   table_dir / "part-00000.parquet")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in {**texts, "doc-filler": ""}.items()))
    manifest = {"attribution": str(table_dir), "corpus": {"path": str(corpus)}, "counts": {"num_docs": len(texts) + 1},
                "model": {"path": ""}, "run_id": cfg.run.id,
                "config": {"corpus": {"window": cfg.corpus.window}}}
    printed = format_summary(manifest, Storage(root), cfg.demo.show).splitlines()

    header = re.match(r"^attribution table: \.\.\.(/\S+)  \((\d+) rows\)$", sample[0])
    assert printed[0].endswith(f"{header.group(1)}  ({header.group(2)} rows)"), (printed[0], sample[0])
    assert int(header.group(2)) == len(facts) * 2 * cfg.score.top_k
    report = re.match(r"^report: \.\.\.(/\S+)$", sample[1])
    assert printed[1] == f"report: {layout.run_report(root, cfg.run.id)}" and printed[1].endswith(report.group(1))
    for line in body:
        assert any(p.startswith(line.removesuffix(" ...")) for p in printed), f"not printed: {line!r}"
    for query_id in {r[0] for r in rows[: len(body)]}:
        assert sum(line.startswith("  ") for line in _lines_of(printed, query_id)) == cfg.demo.show


def _lines_of(printed: list[str], query_id: str) -> list[str]:
    start = printed.index(f"query {query_id}: top proponents") + 1
    end = next((i for i in range(start, len(printed)) if printed[i].startswith("query ")), len(printed))
    return printed[start:end]


def test_shipped_jobs_and_configs_named_in_the_readme_exist():
    readme = (ROOT / "README.md").read_text()
    for path in re.findall(r"`(jobs/[a-z_]+\.py)`", readme):
        assert (ROOT / path).exists(), path
    for path in re.findall(r"`(conf/[a-z_/]+\.yaml)`", readme):
        assert (ROOT / path).exists(), path
