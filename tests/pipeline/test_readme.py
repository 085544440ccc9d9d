"""The README's commands are the ones CI and users run, and its sample output is what the main job prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M).group(1)
    assert command in readme_blocks(), "README's test command and .ci/run differ"
    assert 'pip install -q "torch==2.13.0" -e' in command  # torch in the same pip call: no CUDA wheels


def test_readme_main_command_installs_and_calls_the_main_job_without_overrides():
    assert any(b.endswith("python jobs/attribute.py") and '"torch==2.13.0" -e .' in b for b in readme_blocks())


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
    for line in sample[1:]:
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
                "model": {"path": ""}, "config": {"corpus": {"window": cfg.corpus.window}}}
    printed = format_summary(manifest, Storage(root), cfg.demo.show).splitlines()

    header = re.match(r"^attribution table: \.\.\.(/\S+)  \((\d+) rows\)$", sample[0])
    assert printed[0].endswith(f"{header.group(1)}  ({header.group(2)} rows)"), (printed[0], sample[0])
    assert int(header.group(2)) == len(facts) * 2 * cfg.score.top_k
    for line in sample[1:]:
        assert any(p.startswith(line.removesuffix(" ...")) for p in printed), f"not printed: {line!r}"
    for query_id in {r[0] for r in rows[: len(sample)]}:
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
