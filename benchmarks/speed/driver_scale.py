"""Driver scale (issue 10.6): listing time and driver peak memory for a corpus of many small documents
in 100 Parquet files, and merge time and memory for N shard results, on a local S3 server.

    python -m benchmarks.speed.driver_scale --docs 1000000 --files 100 --shards 10000

A moto S3 server runs in its own process on 127.0.0.1 (its memory is not
the driver's); the corpus and the shard results are generated here, never
committed. The listing (``list_corpus`` + ``make_shards``) and the merge
(``write_run_tables``) each run in a fresh process whose peak resident
memory (``VmHWM``) is the driver's peak. ``--baseline COMMIT`` lists and
merges the same inputs with ``pipeline/`` as of that commit too (e.g.
5840b36: whole-file reads, every id in a dict, every shard result in memory
before issue 10.6).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = np.array("the of a model token query shard window fact river stone light paper north".split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(scratch: str) -> tuple[subprocess.Popen, str, dict]:
    """A moto S3 server process on loopback; its URL and the AWS variables that point s3fs at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/").close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"the moto S3 server did not start on {url}")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_CONFIG_FILE": os.path.join(scratch, "none"), "AWS_SHARED_CREDENTIALS_FILE": os.path.join(scratch, "none")}
    return proc, url, env


def corpus_file(index: int, rows: int, seed: int) -> bytes:
    """One Parquet corpus file: ``rows`` documents of 8 to 16 words, ids ``d{file}-{row}``."""
    rng = np.random.default_rng(seed + index)
    lengths = rng.integers(8, 17, rows)
    words = WORDS[rng.integers(0, len(WORDS), int(lengths.sum()))]
    cuts = np.cumsum(lengths)[:-1]
    texts = [" ".join(chunk) for chunk in np.split(words, cuts)]
    table = pa.table({"id": [f"d{index:03d}-{i:08d}" for i in range(rows)], "text": texts})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=16_384)
    return sink.getvalue().to_pybytes()


def shard_result_file(shard: int, queries: int, top_k: int, seed: int) -> bytes:
    """A shard result as a worker writes it: ``top_k`` windows and documents per (query, polarity)."""
    from pipeline.shard_result import SHARD_RESULT_SCHEMA, shard_parquet_bytes

    rng = np.random.default_rng(seed + shard)
    n = queries * 2 * top_k
    query_ids = np.repeat([f"q{q:04d}" for q in range(queries)], 2 * top_k)
    polarity = np.tile(np.repeat(["proponent", "opponent"], top_k), queries)
    rank = np.tile(np.arange(1, top_k + 1, dtype=np.int32), 2 * queries)
    score = np.where(polarity == "proponent", 1.0, -1.0) * rng.exponential(1.0, n)
    local = rng.permutation(1 << 16)[:n].astype(np.int64)
    columns = {field.name: pa.nulls(2 * n, field.type) for field in SHARD_RESULT_SCHEMA}
    doc_ids = [f"d-{shard}-{i}" for i in local]
    columns.update(
        kind=pa.array(["window"] * n + ["document"] * n),
        query_id=pa.array(np.concatenate([query_ids, query_ids])),
        polarity=pa.array(np.concatenate([polarity, polarity])),
        rank=pa.array(np.concatenate([rank, rank])),
        doc_id=pa.array(doc_ids + doc_ids),
        window=pa.array([0] * n + [None] * n, pa.int32()),
        score=pa.array(np.concatenate([score, score * 1.5])),
        seq_key=pa.array(np.concatenate([(shard << 32) | local, (shard << 32) | local])),
        text=pa.array([f"window {i} of shard {shard}" for i in local] + [None] * n),
        char_start=pa.array([0] * n + [None] * n, pa.int64()),
        char_end=pa.array([40] * n + [None] * n, pa.int64()),
        num_windows=pa.array([None] * n + [1] * n, pa.int32()),
    )
    return shard_parquet_bytes(pa.table(columns, schema=SHARD_RESULT_SCHEMA), "offsets")


def upload(fs, items: dict[str, bytes], batch: int = 500) -> None:
    keys = list(items)
    for start in range(0, len(keys), batch):
        fs.pipe({k: items[k] for k in keys[start : start + batch]})


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, it starts afresh at exec,
    so the parent's memory at fork time does not count)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def listing_child(args: dict) -> dict:
    """The driver's listing in this process: ``list_corpus`` + ``make_shards``; time and peak RSS."""
    from pipeline.corpus import list_corpus, make_shards

    imported = peak_rss_mib()
    start = time.perf_counter()
    files = list_corpus(args["corpus"], "id", "text")
    listed = time.perf_counter() - start
    shards = make_shards(files, args["docs_per_shard"])
    return {"listing_s": round(listed, 2), "listing_and_shards_s": round(time.perf_counter() - start, 2),
            "docs": sum(f.num_rows for f in files), "files": len(files), "shards": len(shards),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_after_imports_mib": round(imported, 1)}


def merge_child(args: dict) -> dict:
    """The merge stage's ``write_run_tables`` in this process over the uploaded shard results."""
    from pipeline.shard_result import TOKEN_ROWS
    from pipeline.storage import Storage
    from pipeline.tables import RunMetadata, queries_table, write_run_tables

    imported = peak_rss_mib()
    storage = Storage(args["root"])
    urls = {i: f"{args['root']}/results/{i:06d}.parquet" for i in range(args["shards"])}
    meta = RunMetadata("bench", "model", "factors", "queries", "config")
    start = time.perf_counter()
    table = write_run_tables(storage, "bench", urls, args["top_k"], queries_table([], []), meta, TOKEN_ROWS)
    return {"merge_s": round(time.perf_counter() - start, 2), "shards": args["shards"], "rows": table.num_rows,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "rss_after_imports_mib": round(imported, 1)}


def run_child(mode: str, args: dict, env: dict, pythonpath: str = _REPO) -> dict:
    # The working directory comes first on sys.path with -m: it picks which pipeline/ is measured.
    out = subprocess.run([sys.executable, "-m", "benchmarks.speed.driver_scale", f"--child-{mode}", json.dumps(args)],
                         env={**os.environ, **env, "PYTHONPATH": pythonpath, "TQDM_DISABLE": "1"},
                         capture_output=True, text=True, cwd=pythonpath, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {mode} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_tree(commit: str, scratch: str) -> str:
    """A folder holding ``pipeline/`` and ``benchmarks/`` as of ``commit`` (this file copied in), for PYTHONPATH."""
    folder = os.path.join(scratch, f"baseline-{commit}")
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", _REPO, "archive", commit, "pipeline", "benchmarks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    with open(__file__, "rb") as src, open(os.path.join(folder, "benchmarks", "speed", "driver_scale.py"), "wb") as dst:
        dst.write(src.read())
    return folder


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--docs-per-shard", type=int, default=256)
    parser.add_argument("--shards", type=int, default=10_000, help="shard results to merge (0: no merge)")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--baseline", default="", help="a commit whose listing to measure too")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="driver-scale-") as scratch:
        server, url, env = start_s3_server(scratch)
        try:
            os.environ.update(env)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            out: dict = {"s3_server": "moto, loopback, own process", "docs_per_file": args.docs // args.files}
            start = time.perf_counter()
            for i in range(args.files):
                fs.pipe_file(f"bench/corpus/part-{i:03d}.parquet", corpus_file(i, args.docs // args.files, 0))
            out["corpus_bytes"] = sum(fs.du("bench/corpus", total=False).values())
            out["generate_corpus_s"] = round(time.perf_counter() - start, 1)
            listing = {"corpus": "s3://bench/corpus", "docs_per_shard": args.docs_per_shard}
            out["listing"] = run_child("listing", listing, env)
            if args.baseline:
                baseline = baseline_tree(args.baseline, scratch)
                out["listing_baseline"] = run_child("listing", listing, env, baseline)
                out["listing_baseline"]["commit"] = args.baseline
            if args.shards:
                start = time.perf_counter()
                results = {f"bench/merge/results/{i:06d}.parquet": shard_result_file(i, args.queries, args.top_k, 0)
                           for i in range(args.shards)}
                upload(fs, results)
                out["merge_input_bytes"] = sum(len(v) for v in results.values())
                del results
                out["generate_results_s"] = round(time.perf_counter() - start, 1)
                out["merge"] = run_child("merge", {"root": "s3://bench/merge", "shards": args.shards,
                                                   "top_k": args.top_k}, env)
                out["merge"].update(queries=args.queries, top_k=args.top_k)
                if args.baseline:
                    out["merge_baseline"] = run_child("merge", {"root": "s3://bench/merge", "shards": args.shards,
                                                                "top_k": args.top_k}, env, baseline)
        finally:
            server.terminate()
            server.wait()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--child-listing", "--child-merge"):
        child = listing_child if sys.argv[1] == "--child-listing" else merge_child
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(main(sys.argv[1:]), indent=2))
