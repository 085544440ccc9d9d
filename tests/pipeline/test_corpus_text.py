"""Corpus text that cannot be attributed: nulls and non-strings counted per file, bad bytes named by file and line.

Through ``run_attribution`` with ``ray.init`` refused, as tests/pipeline/test_bad_input.py does: each error is
raised on the driver before Ray starts, with a one-line message naming the file and the key to change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import AttributeConfig, CorpusConfig, ModelConfig, QueriesConfig, StorageConfig
from pipeline.corpus import bad_text_counts, list_corpus, make_shards, read_shard
from pipeline.errors import BadInputError, ConfigError
from tests.helpers import job_fails, write_jsonl

QUERY = {"id": "q1", "prompt": "The capital of Zorbia is", "completion": " Quelmont."}


def config(tmp_path: Path, corpus: str, **corpus_args) -> AttributeConfig:
    model = tmp_path / "model"  # passes the driver's folder check by its file names; never loaded here
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_text("not really weights")
    return AttributeConfig(
        model=ModelConfig(path=str(model)),
        corpus=CorpusConfig(path=corpus, **corpus_args),
        queries=QueriesConfig(path=write_jsonl(tmp_path / "queries.jsonl", [QUERY])),
        storage=StorageConfig(root=str(tmp_path / "out")),
    )


def mixed_corpus(tmp_path: Path) -> tuple[str, str, str, str]:
    """A folder with a JSONL file (one null, two non-strings), a Parquet file (two nulls) and a clean file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    jsonl = write_jsonl(folder / "a.jsonl", [{"id": "a1", "text": "fine"}, {"id": "a2", "text": None},
                                              {"id": "a3", "text": 7}, {"id": "a4", "text": ["x"]}])
    parquet = str(folder / "b.parquet")
    pq.write_table(pa.table({"id": ["b1", "b2", "b3", "b4"], "text": ["x", None, "y", None]}), parquet,
                   row_group_size=2)  # statistics per row group: both are summed
    clean = write_jsonl(folder / "c.jsonl", [{"id": "c1", "text": "clean"}])
    return str(folder), jsonl, parquet, clean


def test_nulls_and_non_strings_are_counted_per_file_and_logged(tmp_path, caplog):
    folder, jsonl, parquet, clean = mixed_corpus(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.corpus"):
        files = list_corpus(folder, "id", "text")
    counts = {f.url: (f.num_null_texts, f.num_nonstring_texts) for f in files}
    assert counts == {jsonl: (1, 2), parquet: (2, 0), clean: (0, 0)}
    assert bad_text_counts(files) == {
        "num_null_texts": 3,
        "num_nonstring_texts": 2,
        "bad_texts_per_file": {jsonl: {"null": 1, "non_string": 2}, parquet: {"null": 2, "non_string": 0}},
    }
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and jsonl in logged[0] and "line 2" in logged[0] and parquet in logged[1]
    # The workers skip those documents (reported as skipped, never scored as text).
    docs = [d for s in make_shards(files, 10) for d in read_shard(s, "id", "text")]
    assert [t for _, t in docs] == ["fine", "", "", "", "x", "", "y", "", "clean"]


def test_a_non_string_parquet_column_counts_every_row(tmp_path):
    path = str(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": pa.array([1, None, 3], pa.int64())}), path)
    (f,) = list_corpus(path, "id", "text")
    assert (f.num_null_texts, f.num_nonstring_texts) == (1, 2)


def test_the_run_records_the_counts_before_ray(tmp_path, no_ray):
    from pipeline.context import prepare

    folder, jsonl, _, _ = mixed_corpus(tmp_path)
    ctx = prepare(config(tmp_path, folder))
    assert ctx.bad_texts["num_null_texts"] == 3 and ctx.bad_texts["bad_texts_per_file"][jsonl]["non_string"] == 2


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_on_bad_text_error_stops_the_run_naming_the_file(tmp_path, no_ray, fmt):
    _, jsonl, parquet, _ = mixed_corpus(tmp_path)
    path, where = (jsonl, "line 2") if fmt == "jsonl" else (parquet, "row 1")
    job_fails(config(tmp_path, path, on_bad_text="error"), BadInputError, path, where, "corpus.on_bad_text=skip")


def test_on_bad_text_is_validated(tmp_path, no_ray):
    job_fails(config(tmp_path, "unused", on_bad_text="drop"), ConfigError, "corpus.on_bad_text", "'drop'")


@pytest.mark.parametrize("which", ["corpus", "queries"])
def test_non_utf8_jsonl_names_the_file_and_line(tmp_path, no_ray, which):
    bad = tmp_path / f"{which}-latin1.jsonl"
    good = json.dumps({"id": "a", "text": "ok", **QUERY}).encode()
    latin1 = '{"id": "b", "text": "caf\u00e9", "prompt": "p", "completion": "c"}\n'.encode("latin-1")
    bad.write_bytes(good + b"\n\n" + latin1)
    clean = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}])
    cfg = config(tmp_path, str(bad) if which == "corpus" else clean)
    if which == "queries":
        cfg.queries.path = str(bad)
    job_fails(cfg, BadInputError, str(bad), "line 3", "not valid UTF-8", "0xe9")
