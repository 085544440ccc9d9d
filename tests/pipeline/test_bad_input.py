"""Bad input fails on the driver, before any Ray is started, with a message that names the input at fault.

Default tier: every case goes through ``run_attribution`` with ``ray.init``
replaced by a function that fails the test, so an error raised anywhere
after Ray would have started shows up as such; afterwards Ray must not be
initialised. Integration tier: S3 with rejected credentials, and document ids
that look like paths surviving a real run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
from pipeline.errors import BadInputError, ConfigError, MergeRefusedError, StorageError
from tests.helpers import job_fails, local_ray, scratch_env, write_jsonl

REPO = Path(__file__).resolve().parents[2]
QUERY = {"id": "q1", "prompt": "The capital of Zorbia is", "completion": " Quelmont."}


# ---- helpers ----------------------------------------------------------------------------------


def fake_model(folder: Path, files=("config.json", "model.safetensors")) -> str:
    """A folder that passes or fails the driver's model check by its file names (no real weights needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text("{}" if name.endswith(".json") else "not really weights")
    return str(folder)


def write_parquet(path: Path, rows: dict) -> str:
    pq.write_table(pa.table(rows), path)
    return str(path)


def good_corpus(tmp_path: Path) -> str:
    return write_parquet(tmp_path / "corpus.parquet", {"id": ["a", "b"], "text": ["Some text here.", "More text."]})


def good_queries(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "queries.jsonl", [QUERY])


def config(tmp_path: Path, **parts) -> AttributeConfig:
    """A config whose inputs are all valid unless overridden (model, corpus, queries, storage)."""
    model = parts.pop("model", None) or fake_model(tmp_path / "model")
    corpus = parts.pop("corpus", None) or good_corpus(tmp_path)
    queries = parts.pop("queries", None) or good_queries(tmp_path)
    root = parts.pop("root", None) or str(tmp_path / "out")
    return AttributeConfig(
        model=ModelConfig(path=model),
        corpus=CorpusConfig(path=corpus, **parts.pop("corpus_args", {})),
        queries=QueriesConfig(path=queries),
        storage=StorageConfig(root=root),
        **parts,
    )


# ---- the control: valid inputs pass validation ---------------------------------------------------


def test_valid_inputs_pass_prepare(tmp_path, no_ray):
    from pipeline.context import prepare

    ctx = prepare(config(tmp_path))
    assert ctx.counts == {"num_files": 1, "num_docs": 2, "num_shards": 1, "num_queries": 1}


# ---- corpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["id", "text"])
def test_parquet_without_required_column(tmp_path, no_ray, missing):
    cols = {"id": ["a"], "text": ["x y z"]}
    cols["other"] = cols.pop(missing)
    corpus = write_parquet(tmp_path / "c.parquet", cols)
    msg = job_fails(config(tmp_path, corpus=corpus), BadInputError, corpus, repr(missing))
    assert "corpus.id_column" in msg  # says how to fix it


@pytest.mark.parametrize("missing", ["id", "text"])
def test_jsonl_without_required_field(tmp_path, no_ray, missing):
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    del rows[1][missing]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    job_fails(config(tmp_path, corpus=corpus), BadInputError, corpus, "record 2", repr(missing))


def test_renamed_columns_are_honoured(tmp_path, no_ray):
    from pipeline.context import prepare

    corpus = write_parquet(tmp_path / "c.parquet", {"doc": ["a"], "body": ["x y z"]})
    ctx = prepare(config(tmp_path, corpus=corpus, corpus_args={"id_column": "doc", "text_column": "body"}))
    assert ctx.counts["num_docs"] == 1


def test_duplicate_ids_across_two_files(tmp_path, no_ray):
    folder = tmp_path / "corpus"
    folder.mkdir()
    first = write_parquet(folder / "part-0.parquet", {"id": ["a", "dup-7"], "text": ["x", "y"]})
    second = write_jsonl(folder / "part-1.jsonl", [{"id": "b", "text": "z"}, {"id": "dup-7", "text": "w"}])
    job_fails(config(tmp_path, corpus=str(folder)), BadInputError, "'dup-7'", first, second)


def test_duplicate_ids_are_compared_as_strings(tmp_path, no_ray):
    # 7 in one file and "7" in another become the same doc_id in the table.
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": 7, "text": "x"}])
    write_jsonl(folder / "b.jsonl", [{"id": "7", "text": "y"}])
    job_fails(config(tmp_path, corpus=str(folder)), BadInputError, "duplicate document id '7'")


def test_corrupt_parquet(tmp_path, no_ray):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(os.urandom(4096))
    job_fails(config(tmp_path, corpus=str(path)), BadInputError, str(path), "not a readable Parquet file")


def test_invalid_jsonl_line(tmp_path, no_ray):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    job_fails(config(tmp_path, corpus=str(path)), BadInputError, str(path), "line 2")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_empty_corpus(tmp_path, no_ray, fmt):
    if fmt == "parquet":
        corpus = write_parquet(
            tmp_path / "empty.parquet", {"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}
        )
    else:
        corpus = write_jsonl(tmp_path / "empty.jsonl", [])
    job_fails(config(tmp_path, corpus=corpus), BadInputError, corpus, "no documents")


def test_missing_corpus_path(tmp_path, no_ray):
    missing = str(tmp_path / "nowhere" / "corpus.parquet")
    job_fails(config(tmp_path, corpus=missing), BadInputError, missing, "does not exist")


def test_folder_without_data_files(tmp_path, no_ray):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "README.txt").write_text("nothing here")
    job_fails(config(tmp_path, corpus=str(folder)), BadInputError, str(folder), "no Parquet or JSONL")


def test_empty_document_id(tmp_path, no_ray):
    corpus = write_parquet(tmp_path / "c.parquet", {"id": ["a", ""], "text": ["x", "y"]})
    job_fails(config(tmp_path, corpus=corpus), BadInputError, corpus, "empty 'id'")


def test_document_ids_with_slashes_are_data_not_paths(tmp_path, no_ray):
    from pipeline.context import prepare

    corpus = write_parquet(
        tmp_path / "c.parquet", {"id": ["dir/doc-1", "../up", ".hidden", "a\\b"], "text": ["w x", "y z", "u v", "s t"]}
    )
    ctx = prepare(config(tmp_path, corpus=corpus))
    assert ctx.counts["num_docs"] == 4
    # Shard ids are derived from the file and row range, never from document ids.
    assert all("/" not in s.shard_id for s in ctx.shards)


# ---- queries --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["id", "prompt", "completion"])
def test_query_missing_field(tmp_path, no_ray, field):
    bad = {k: v for k, v in QUERY.items() if k != field}
    queries = write_jsonl(tmp_path / "q.jsonl", [dict(QUERY, id="q0"), bad])
    job_fails(config(tmp_path, queries=queries), BadInputError, queries, "query 2", repr(field))


def test_query_with_empty_completion(tmp_path, no_ray):
    queries = write_jsonl(tmp_path / "q.jsonl", [QUERY, {"id": "q-empty", "prompt": "Hello", "completion": ""}])
    job_fails(config(tmp_path, queries=queries), BadInputError, queries, "'q-empty'", "empty completion")


def test_query_parquet_missing_field(tmp_path, no_ray):
    queries = write_parquet(tmp_path / "q.parquet", {"id": ["q1"], "prompt": ["Hello"]})
    job_fails(config(tmp_path, queries=queries), BadInputError, queries, "'completion'")


def test_duplicate_query_ids(tmp_path, no_ray):
    queries = write_jsonl(tmp_path / "q.jsonl", [QUERY, QUERY])
    job_fails(config(tmp_path, queries=queries), BadInputError, queries, "duplicate query ids ['q1']")


def test_no_queries(tmp_path, no_ray):
    queries = write_jsonl(tmp_path / "q.jsonl", [])
    job_fails(config(tmp_path, queries=queries), BadInputError, queries, "no queries")


# ---- model ----------------------------------------------------------------------------------


def test_model_folder_without_weights(tmp_path, no_ray):
    model = fake_model(tmp_path / "m", ["config.json"])
    job_fails(config(tmp_path, model=model), BadInputError, "model.path", model, "no .safetensors weights")


def test_model_folder_with_only_pickle_weights(tmp_path, no_ray):
    model = fake_model(tmp_path / "m", ["config.json", "pytorch_model.bin"])
    msg = job_fails(config(tmp_path, model=model), BadInputError, "model.path", model, "no .safetensors weights")
    assert ".bin" in msg and "convert" in msg


def test_model_folder_with_only_a_bin_file(tmp_path, no_ray):
    model = fake_model(tmp_path / "m", ["pytorch_model.bin"])
    job_fails(config(tmp_path, model=model), BadInputError, "model.path", model, "no config.json")


def test_model_path_that_is_a_file(tmp_path, no_ray):
    path = tmp_path / "model.safetensors"
    path.write_text("x")
    job_fails(config(tmp_path, model=str(path)), BadInputError, "model.path", str(path), "not a folder")


def test_model_path_without_corpus_path(tmp_path, no_ray):
    cfg = AttributeConfig(model=ModelConfig(path=fake_model(tmp_path / "m")))
    job_fails(cfg, ValueError, "corpus.path", "queries.path", "model.path")


# ---- storage --------------------------------------------------------------------------------


def test_storage_root_under_a_regular_file(tmp_path, no_ray):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = str(blocker / "out")
    job_fails(config(tmp_path, root=root), StorageError, root, "not writable")


def test_storage_root_in_a_read_only_folder(tmp_path, no_ray):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        job_fails(config(tmp_path, root=str(ro / "out")), StorageError, str(ro / "out"), "not writable")
    finally:
        ro.chmod(0o700)


# ---- config values --------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../x", "a/b", ".hidden", "..", "", "a b"])
def test_bad_run_ids_are_rejected(tmp_path, no_ray, run_id):
    cfg = config(tmp_path, run=RunConfig(id=run_id))
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert "run.id" in str(e.value)
    job_fails(cfg, ValueError, "run.id")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "part, key",
    [
        ({"score": ScoreConfig(top_k=0)}, "score.top_k"),
        ({"factors": FactorsConfig(damping=-1.0)}, "factors.damping"),
        ({"factors": FactorsConfig(damping="big")}, "factors.damping"),
        ({"cluster": ClusterConfig(num_workers=0)}, "cluster.num_workers"),
        ({"corpus_args": {"window": 1}}, "corpus.window"),
        ({"corpus_args": {"docs_per_shard": 0}}, "corpus.docs_per_shard"),
    ],
)
def test_bad_values_name_their_key(tmp_path, no_ray, part, key):
    job_fails(config(tmp_path, **part), ValueError, key)


# ---- the job entry point ---------------------------------------------------------------------


def test_job_rejects_escaping_run_id_with_status_2(tmp_path):
    with scratch_env() as scratch:
        env = dict(os.environ, HYDRA_FULL_ERROR="0")
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "attribute.py"), "run.id=../escape",
             f"hydra.run.dir={tmp_path / 'hydra'}", f"storage.root={tmp_path / 'out'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        ray_dirs = [p for p in os.listdir(scratch) if p != "home"]
        home = os.listdir(os.path.join(scratch, "home"))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "run.id" in lines[0] and "../escape" in lines[0] and "Traceback" not in output
    assert not ray_dirs and ".ray" not in home, f"Ray left files behind: {ray_dirs} {home}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "error",
    [ConfigError("score.top_k must be >= 1"), BadInputError("queries.jsonl: no queries"),
     StorageError("writing s3://b/x failed"), MergeRefusedError("cannot merge run 'r'")],
)
def test_project_errors_end_the_job_with_one_line_and_status_2(error, caplog):
    from pipeline.jobs_common import exit_on_bad_input

    with pytest.raises(SystemExit) as e, exit_on_bad_input():
        raise error
    assert e.value.code == (3 if isinstance(error, StorageError) else 2)  # a storage fault is infrastructure (3)
    assert [r.getMessage() for r in caplog.records] == [f"{type(error).__name__}: {error}"]


def test_an_internal_value_error_keeps_its_traceback():
    from pipeline.jobs_common import exit_on_bad_input

    # A bug (a plain ValueError from deep inside, e.g. a shape check) is not bad input: it must propagate.
    with pytest.raises(ValueError, match="internal") as e, exit_on_bad_input():
        raise ValueError("internal: shapes (3, 4) and (5,) do not match")
    assert type(e.value) is ValueError


# ---- merge: shard results it cannot merge ----------------------------------------------------


def test_merge_refuses_shards_scored_with_another_top_k():
    from pipeline.commit import Commit
    from pipeline.merge import refuse_unmergeable

    commits = {f"s{i}": Commit(queries_id="q-1", top_k=10) for i in range(3)}
    refuse_unmergeable("r", commits, "q-1", 10)  # the control: same queries, same top_k
    with pytest.raises(MergeRefusedError) as e:
        refuse_unmergeable("r", commits, "q-1", 20)
    message = str(e.value)
    assert "score.top_k=20" in message and "score.top_k=10" in message and "'s0'" in message
    assert "run.overwrite=true" in message  # says how to fix it
    with pytest.raises(MergeRefusedError, match="other queries"):
        refuse_unmergeable("r", commits, "q-2", 10)
    with pytest.raises(MergeRefusedError, match="not committed"):
        refuse_unmergeable("r", dict(commits, s3=None), "q-1", 10)


# ---- integration: S3 with rejected credentials, path-like ids through a real run ------------


@pytest.mark.integration
def test_s3_with_wrong_credentials(tmp_path, s3_auth, monkeypatch, no_ray):
    import s3fs

    bucket, key_id, secret = s3_auth  # moto now checks every request's signature
    root = f"{bucket}/attribution"
    wrong = "wrong-" + uuid.uuid4().hex
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        s3fs.S3FileSystem.clear_instance_cache()
        msg = job_fails(config(tmp_path, root=root), StorageError, root, "credentials were rejected")
        assert wrong not in msg
        # Control: the right secret passes the same check.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        s3fs.S3FileSystem.clear_instance_cache()
        from pipeline.context import prepare

        prepare(config(tmp_path, root=root))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.integration
def test_path_like_document_ids_survive_a_run(tmp_path, small_demo):
    """Ids are data: ``dir/doc``, ``../up``, ``.hidden`` come back unchanged in the table (local Ray)."""
    from pipeline.run import run_attribution
    from tests.helpers import read_table

    table = pq.read_table(small_demo.corpus_path).slice(0, 12)
    ids = ["dir/doc-0", "../up", ".hidden", "a\\b", "s3://not/a/url"] + table.column("id").to_pylist()[5:]
    corpus = write_parquet(tmp_path / "c.parquet", {"id": ids, "text": table.column("text").to_pylist()})
    cfg = AttributeConfig(
        model=ModelConfig(path=small_demo.model_dir),
        corpus=CorpusConfig(path=corpus, docs_per_shard=6),
        queries=QueriesConfig(path=small_demo.queries_path),
        storage=StorageConfig(root=str(tmp_path / "out")),
        run=RunConfig(id="ids"),
        score=ScoreConfig(top_k=20),
        cluster=ClusterConfig(num_workers=1, cpus_per_worker=0.5),
    )
    with local_ray():
        manifest = run_attribution(cfg)
    got = set(read_table(manifest["attribution"]).column("doc_id").to_pylist())
    assert {"dir/doc-0", "../up", ".hidden", "a\\b", "s3://not/a/url"} <= got
    assert not (tmp_path / "up").exists() and not (tmp_path / "out" / "dir").exists()
