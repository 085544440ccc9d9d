"""Query preconditioning on SmolLM2-135M: the factors read whole (until 2026-12-07) or layer by layer, side by side.

Measures what a precondition worker holds: the factors file parsed into
tensors at once (``EKFACFactors.from_bytes`` of the file, bases cast to the
engine's dtype: the worker's code until 2026-12-07) against the file mapped
and each layer copied out when preconditioning reaches it
(``EKFACFactors.from_buffer`` of ``Storage.read_mapped``: the worker's code
now). Each mode runs in a fresh process (its own ``ru_maxrss``), alternating,
``--repeats`` rounds; printed per run: seconds of ``query_gradients`` (the
preconditioning, file reading included) and the process's peak resident
memory during it (sampled every 20 ms; the mapped file's pages count once
touched), also above what it held before (model and queries loaded), and
whether the two modes' query gradients are equal.

The factors are the real shapes of the attribution job's default tracking
(all 90 MLP layers, float32 bases and Lambda as the driver writes them)
with random values (orthonormality does not change what is read or held; a
real fit takes minutes). Queries: ``--queries`` sentences of Python's help
text, prompt and completion split in the middle, windows of 64 tokens, in
batches of 8, the job's default ``score.query_rank``.

    python -m benchmarks.speed.precondition_memory --queries 32 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

import torch
from safetensors.torch import load_file, save_file

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def help_queries(n: int) -> list[tuple[str, str, str]]:
    """``(id, prompt, completion)``: the first sentence of ``n`` help topics, split after half its words."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        words = " ".join(topics[name].split("\n\n")[1:2]).split()[:24]
        if len(words) >= 12:
            half = len(words) // 2
            out.append((f"q-{name}", " ".join(words[:half]), " " + " ".join(words[half:])))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} help topics have 12 words; ask for fewer --queries")


def write_factors(model_dir: str, path: str) -> None:
    """A factors file of the default tracking's shapes for the model in ``model_dir``, random values."""
    from pipeline.config import AttributeConfig
    from pipeline.core.ekfac import Eigenbases, EKFACFactors, LambdaSums
    from pipeline.core.influence import InfluenceEngine
    from pipeline.model_io import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir)
    engine = InfluenceEngine(model, AttributeConfig().influence())
    gen = torch.Generator().manual_seed(0)
    q_a, q_s, sums = {}, {}, {}
    for name, (d_out, d_in) in engine.space_dims(False).items():
        q_a[name] = torch.randn(d_in, d_in, generator=gen) / d_in**0.5
        q_s[name] = torch.randn(d_out, d_out, generator=gen) / d_out**0.5
        sums[name] = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.1
    bases = Eigenbases(q_a, {}, q_s, {}, 1000)
    factors = EKFACFactors.from_parts(engine.factors_meta(), bases, LambdaSums(sums, 100))
    # Lambda rounded to float32, as the driver writes it for a float32 engine (write_factors' lambda_dtype).
    factors = EKFACFactors(factors.meta, factors.q_a, factors.q_s, {n: t.float() for n, t in factors.lambdas.items()})
    with open(path, "wb") as f:
        f.write(factors.to_bytes())


def run_mode(mode: str, model_dir: str, factors_path: str, n_queries: int, out_path: str) -> dict:
    """In this process: precondition the queries with the factors read in ``mode``; the gradients to ``out_path``."""
    from pipeline.config import AttributeConfig
    from pipeline.core.ekfac import EKFACFactors
    from pipeline.core.influence import InfluenceEngine
    from pipeline.core.text import batches_of, encode_query, resolve_tokenisation
    from pipeline.model_io import load_model_and_tokenizer
    from pipeline.storage import Storage

    model, tok = load_model_and_tokenizer(model_dir)
    engine = InfluenceEngine(model, AttributeConfig().influence())
    tokenisation = resolve_tokenisation(tok, None, None)
    queries = [encode_query(tok, i, p, c, 64, tokenisation) for i, p, c in help_queries(n_queries)]
    storage = Storage(os.path.dirname(factors_path))
    gc.collect()
    sampler = RssSampler()
    started = time.perf_counter()
    if mode == "whole":
        factors = EKFACFactors.from_bytes(storage.read_buffer(factors_path), engine.dtype).with_bases_in(
            engine.dtype, engine.device)
    else:
        factors = EKFACFactors.from_buffer(storage.read_mapped(factors_path), engine.dtype)
    grads = engine.query_gradients(batches_of(queries, 8, tok.pad_token_id), factors, [q.doc_id for q in queries])
    seconds = time.perf_counter() - started
    before, peak = sampler.stop()
    save_file({k: v.contiguous() for k, v in grads.to_tensors().items()}, out_path)
    return {"mode": mode, "seconds": seconds, "peak_gib": peak[0] / 2**30, "before_gib": before[0] / 2**30,
            "anon_peak_gib": peak[1] / 2**30, "anon_before_gib": before[1] / 2**30}


class RssSampler:
    """This process's resident memory sampled every 20 ms on a thread: ``stop()`` gives (at start, peak) of
    all of it and of its anonymous part (resident minus file-backed shared pages: what the process itself
    allocated; a mapped file's pages are the page cache's, given back under pressure)."""

    def __init__(self):
        self._proc = psutil.Process()
        self.start = self.peak = self._sample()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        m = self._proc.memory_info()
        return m.rss, m.rss - m.shared

    def _run(self) -> None:
        while not self._done.wait(0.02):
            now = self._sample()
            self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def stop(self) -> tuple[tuple[int, int], tuple[int, int]]:
        self._done.set()
        self._thread.join()
        return self.start, self.peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=["whole", "layers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--factors", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as one of a 2-core machine's two workers
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.model_dir, args.factors, args.queries, args.out)))
        return
    from pipeline.pretrained import build_smollm2

    model_dir = build_smollm2()
    with tempfile.TemporaryDirectory() as scratch:
        factors = os.path.join(scratch, "factors.safetensors")
        write_factors(model_dir, factors)
        print(f"factors file: {os.path.getsize(factors) / 2**30:.2f} GiB; {args.queries} queries, one thread",
              flush=True)
        runs = []
        for round_ in range(args.repeats):
            for mode in ("whole", "layers"):
                out = os.path.join(scratch, f"{mode}.safetensors")
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.speed.precondition_memory", "--mode", mode, "--model-dir",
                     model_dir, "--factors", factors, "--queries", str(args.queries), "--out", out],
                    cwd=_REPO, capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {mode:6s}: precondition {runs[-1]['seconds']:.1f} s, peak RSS "
                      f"{runs[-1]['peak_gib']:.2f} GiB, {runs[-1]['peak_gib'] - runs[-1]['before_gib']:.2f} above the "
                      f"{runs[-1]['before_gib']:.2f} GiB before it (model and queries loaded); anonymous "
                      f"{runs[-1]['anon_peak_gib'] - runs[-1]['anon_before_gib']:.2f} GiB above the start",
                      flush=True)
        whole, layers = (load_file(os.path.join(scratch, f"{m}.safetensors")) for m in ("whole", "layers"))
        equal = whole.keys() == layers.keys() and all(torch.equal(whole[k], layers[k]) for k in whole)
    for mode in ("whole", "layers"):
        mine = [r for r in runs if r["mode"] == mode]
        print(f"median {mode:6s}: {statistics.median(r['seconds'] for r in mine):.1f} s, peak RSS "
              f"{statistics.median(r['peak_gib'] for r in mine):.2f} GiB, "
              f"{statistics.median(r['peak_gib'] - r['before_gib'] for r in mine):.2f} GiB above the start, anonymous "
              f"{statistics.median(r['anon_peak_gib'] - r['anon_before_gib'] for r in mine):.2f} GiB above it")
    print(f"query gradients equal: {equal}")


if __name__ == "__main__":
    main()
