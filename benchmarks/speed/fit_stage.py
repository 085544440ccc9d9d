"""The attribution job's fit stage, this tree against a baseline commit, side by side: wall time and driver memory.

Both run ``jobs/attribute.py run.stages=[fit]`` as subprocesses on the same inputs (the speed benchmark's
``model.preset=smollm2`` corpus: the pretrained SmolLM2-135M, the planted-facts documents cycled to
``--n-docs``), each in fresh storage, alternating (baseline first) for ``--repeats`` rounds. Printed per
run: the fit stage's seconds (the job's ``stage fit`` log line), the eigendecomposition line of its log,
the factors file's size and the driver process's peak resident memory (sampled every 0.1 s; Ray's
workers are other processes).
The baseline tree is ``git archive`` of ``--baseline`` (pipeline/, jobs/, conf/) put first on PYTHONPATH,
also for the job's Ray workers, which inherit it.

    python -m benchmarks.speed.fit_stage --baseline d0a360e --n-docs 128 --window 128 --repeats 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def baseline_tree(commit: str, scratch: str) -> str:
    """``pipeline/``, ``jobs/`` and ``conf/`` as of ``commit`` in a folder under ``scratch``."""
    folder = os.path.join(scratch, f"baseline-{commit}")
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", _REPO, "archive", commit, "pipeline", "jobs", "conf"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def prepare(n_docs: int, window: int, scratch: str) -> dict:
    """The speed benchmark's smollm2 inputs (its own builder), written under ``scratch``."""
    from benchmarks.speed.config import BenchmarkConfig
    from benchmarks.speed.inputs import prepare_inputs

    cfg = BenchmarkConfig()
    cfg.model.preset, cfg.n_docs, cfg.window, cfg.query_counts, cfg.throughput_queries = "smollm2", n_docs, window, [], 1
    inputs = prepare_inputs(cfg, scratch)
    return {"model": inputs.model_dir, "corpus": inputs.corpus_path, "queries": inputs.queries_paths[1]}


def _peak_rss(pid: int, out: list, stop: threading.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out[0] = max(out[0], proc.memory_info().rss)
        except psutil.Error:
            return
        stop.wait(0.1)


def run_fit(tree: str, inputs: dict, root: str, window: int, workers: int) -> dict:
    """One fit stage in fresh storage ``root`` with the code of ``tree``: seconds, peak driver RSS, log lines."""
    env = {**os.environ, "PYTHONPATH": tree, "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, os.path.join(tree, "jobs", "attribute.py"), f"model.path={inputs['model']}",
           f"corpus.path={inputs['corpus']}", f"queries.path={inputs['queries']}", f"storage.root={root}",
           f"corpus.window={window}", "corpus.docs_per_shard=32", "run.stages=[fit]", "run.id=fit",
           f"cluster.num_workers={workers}", f"hydra.run.dir={root}/hydra"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tree, env=env)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fit in {tree} failed ({proc.returncode}):\n{output[-4000:]}")
    stage = re.search(r"stage fit: ([0-9.]+)s", output)
    eigh = [line.split("INFO", 1)[-1].strip() for line in output.splitlines() if "eigendecompositions in" in line]
    (factors,) = glob.glob(os.path.join(root, "factors", "*", "factors.safetensors"))
    return {"fit_s": float(stage.group(1)) if stage else None, "wall_s": round(wall, 1),
            "driver_peak_rss_gib": round(peak[0] / 2**30, 2), "factors_gib": round(os.path.getsize(factors) / 2**30, 3),
            "eigh_log": eigh[-1] if eigh else ""}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--n-docs", type=int, default=128)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="fit-stage-")  # inputs, baseline tree and both runs' storage: ~10 GB
    try:
        inputs = prepare(args.n_docs, args.window, scratch)
        trees = {"baseline": baseline_tree(args.baseline, scratch), "this tree": _REPO}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.repeats):
            for name, tree in trees.items():
                result = run_fit(tree, inputs, os.path.join(scratch, f"out-{name.replace(' ', '-')}-{r}"), args.window,
                                 args.workers)
                runs[name].append(result)
                print(f"{name} (round {r + 1}): {json.dumps(result)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {name: {"fit_s_median": statistics.median(x["fit_s"] for x in rs),
                      "driver_peak_rss_gib_median": statistics.median(x["driver_peak_rss_gib"] for x in rs)}
               for name, rs in runs.items()}
    base, mine = summary["baseline"], summary["this tree"]
    summary["ratios (this tree / baseline)"] = {
        "fit_s": round(mine["fit_s_median"] / base["fit_s_median"], 3),
        "driver_peak_rss": round(mine["driver_peak_rss_gib_median"] / base["driver_peak_rss_gib_median"], 3)}
    print(json.dumps({"baseline": args.baseline, "inputs": {k: v for k, v in vars(args).items()}, **summary},
                     indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
