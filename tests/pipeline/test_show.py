"""The terminal view (pipeline.show, jobs/show.py) on run tables written to a scratch storage root."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa

from pipeline import layout
from pipeline.show import ShowOptions, format_query, printable
from pipeline.storage import Storage
from pipeline.tables import ATTRIBUTION, LAYERS, QUERIES, SCHEMAS, TABLES, TOKENS, RunMetadata, parquet_bytes

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def write_run(root: str, run_id: str = "r") -> Storage:
    """A run with one query: a proponent with tokens (one special, one U+FFFD, one a terminal escape), an opponent."""
    storage = Storage(root)
    base = dict(query_id="q1", doc_id="d1", window=0, run_id=run_id)
    tables = {name: SCHEMAS[name].empty_table() for name in TABLES}
    tables[ATTRIBUTION] = pa.Table.from_pylist(
        [base | dict(polarity="proponent", rank=1, score=2.0, text="ab\x1b[2Jc\ufffd<|endoftext|>", char_start=0,
                     char_end=9),
         base | dict(polarity="opponent", rank=1, doc_id="d2", score=-1.0, text="plain text", char_start=None,
                     char_end=None)], SCHEMAS[ATTRIBUTION])
    pieces = [("ab", 1.5, False), ("\x1b[2J", 0.25, False), ("c\ufffd", -0.25, False), ("<|endoftext|>", 0.5, True)]
    tables[TOKENS] = pa.Table.from_pylist(
        [base | dict(polarity="proponent", rank=1, position=i, token_id=i, token_text=t, special=sp, char_start=None,
                     char_end=None, score=s) for i, (t, s, sp) in enumerate(pieces)], SCHEMAS[TOKENS])
    tables[LAYERS] = pa.Table.from_pylist(
        [base | dict(polarity="proponent", rank=1, layer_index=0, layer="h.0.mlp", score=2.0)], SCHEMAS[LAYERS])
    tables[QUERIES] = pa.Table.from_pylist(
        [dict(query_id="q1", prompt="Say", completion=" hi", log_prob=-0.7, num_completion_tokens=1, run_id=run_id)],
        SCHEMAS[QUERIES])
    meta = RunMetadata(run_id, "m", "f-1", "q-1", "c")
    for name, table in tables.items():
        storage.write_bytes(layout.run_table_part(root, run_id, name), parquet_bytes(table, meta, name))
    return storage


def test_a_query_with_coloured_tokens(tmp_path):
    storage = write_run(str(tmp_path))
    text = format_query(storage, "r", "q1")
    assert "log p(completion | prompt) = -0.7" in text and "factors f-1" in text
    assert "\x1b[48;5;46m" in text  # the strongest positive token on the strongest green
    assert "\x1b[4m<|endoftext|>" in text  # special tokens underlined
    assert "\ufffd" in text and "\\x1b[2J" in text and "\x1b[2J" not in text  # the document's escape is shown, inert
    assert "layers: h.0.mlp +2" in text and "d2" in text and "plain text" in text
    plain = format_query(storage, "r", "q1", ShowOptions(color=False, polarity="opponent"))
    assert "\x1b" not in plain and "d2" in plain and "proponents" not in plain


def test_unknown_query_and_missing_run_say_so(tmp_path):
    storage = write_run(str(tmp_path))
    assert "has no query 'nope'; its queries: q1" in format_query(storage, "r", "nope")
    assert "no tables under" in format_query(storage, "other", "q1")


def test_printable_escapes_control_characters():
    assert printable("a\nb\x07\x9b") == "a\u23ceb\\x07\\x9b"


def test_the_job_prints_the_query(tmp_path):
    write_run(str(tmp_path))
    out = subprocess.run(
        [sys.executable, "jobs/show.py", f"storage.root={tmp_path}", "run.id=r", "query=q1", "show.color=false",
         f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run r  query q1" in out.stdout and "d1" in out.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/show.py", f"storage.root={tmp_path}", "run.id=r", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "query is empty" in bad.stdout + bad.stderr


def test_the_shipped_config_composes_to_the_dataclass_defaults():
    from hydra import compose, initialize_config_dir

    from pipeline.config import to_typed
    from pipeline.show import ShowConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(os.path.join(REPO, "conf")), version_base="1.3"):
        cfg = to_typed(ShowConfig, compose("show", ["query=q1"]))
    assert cfg == ShowConfig(query="q1")
