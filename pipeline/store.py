"""The gradient store (issue 8): windows' gradient blocks written by the score pass, new queries scored without a model.

With ``store.enabled=true`` the score pass also writes, per shard, every
window's block ``Q_S,k^T G Q_A,k`` per tracked layer (`pipeline.core.store`),
teed from the pass's own capture (no second forward or backward), as one
``(windows, width)`` matrix of ``store.dtype`` plus the windows' keys and
text. With ``score.source=store`` the score stage answers the run's queries
from it instead: a Ray task turns the preconditioned query gradients into
their blocks (``Q_S,k^T H^-1 G_q Q_A,k``), and one Ray task per shard reads
the shard's store file, multiplies it by every query's block and keeps the
top-k, writing a shard result in the model pass's format (window, document
and layer rows; no token rows: the store has no per-token terms). No model is
loaded by those tasks and no forward or backward pass runs over the corpus.

Storage (``pipeline.layout``), every file a unit committed by its marker::

    store/{store_id}/key.json                          what the store was written under (informative)
    store/{store_id}/basis.safetensors                 the kept eigendirections per layer
    store/{store_id}/shards/{shard_id}.safetensors     one shard's blocks, keys and texts
    store/{store_id}/queries/{queries_id}.safetensors  the queries' blocks

``store_id`` hashes `StoreKey`: the factors id (model, tracked layers,
window, tokenisation, projection), ``store.dim`` and ``store.dtype``; every
file records its key and a reader refuses one written under another
(`StoreMismatchError`), so stores of other factors or dims never mix.
Results scored from the store are keyed apart from exact ones (``ResultsKey.store``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from pipeline import layout
from pipeline.commit import Commit, already_committed, commit_file, committed_checksum, read_file_commit
from pipeline.config import ConfigError
from pipeline.core.ekfac import EKFACFactors
from pipeline.core.queries import QueryGradients
from pipeline.core.store import STORE_DTYPES, StoreBasis, layer_scores, store_scores
from pipeline.core.topk import TopK
from pipeline.identity import digest
from pipeline.shard_result import (
    DOCUMENT,
    LAYER,
    TOKEN_ROWS,
    WINDOW,
    DocumentTopK,
    ShardRows,
    ranked,
    seq_key,
    shard_parquet_bytes,
)
from pipeline.storage import Storage

log = logging.getLogger(__name__)

# Bumped when the stored blocks change meaning for the same key (e.g. another choice of directions).
STORE_FORMAT = 1


class StoreMismatchError(ConfigError):
    """A store file written under other factors, another ``store.dim`` or ``store.dtype`` than the run's."""


@dataclass(frozen=True)
class StoreKey:
    """What determines a gradient store: the factors (hence the model, layers, window, projection), dim, dtype."""

    factors: str
    dim: int
    dtype: str
    format: int = STORE_FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def id(self) -> str:
        return "g-" + digest(self.to_json())

    def mismatch(self, found: dict) -> str | None:
        """What differs in ``found`` (a file's recorded key), in words naming the config key; None when equal."""
        names = {"factors": "factors", "dim": "store.dim", "dtype": "store.dtype", "format": "store format"}
        diffs = [f"{names[k]} {found.get(k)!r} (this run: {v!r})"
                 for k, v in self.to_json().items() if found.get(k) != v]
        return ", ".join(diffs) or None


@dataclass(frozen=True)
class StoreTarget:
    """Where the score pass writes one shard's store file: handed to ``ShardWorker.score`` (plain values)."""

    store_id: str
    key: dict
    basis_url: str

    def shard_url(self, root: str, shard_id: str) -> str:
        return layout.store_shard(root, self.store_id, shard_id)


@dataclass(frozen=True)
class StoreShardJob:
    """One Ray task of scoring from the store: a shard's store file against the queries' blocks."""

    storage_root: str
    storage_options: dict
    key: dict
    shard: object  # pipeline.corpus.Shard
    store_url: str
    blocks_url: str
    out_url: str
    top_k: int
    queries_id: str
    token_rows: int = TOKEN_ROWS


# ---- writing (inside the score pass, on a ShardWorker) --------------------------------------


class StoreWriter:
    """One shard's store rows, gathered batch by batch (`add`), then written and committed (`commit`)."""

    def __init__(self, target: StoreTarget, basis: StoreBasis):
        self.target, self.basis = target, basis
        self.dtype = STORE_DTYPES[target.key["dtype"]]
        self.rows: list[torch.Tensor] = []
        self.finite: list[torch.Tensor] = []

    def add(self, captured: dict) -> None:
        blocks = self.basis.window_blocks(captured).detach()
        stored = blocks.to("cpu", self.dtype)
        # A block that is not finite, or overflows the store's dtype, is kept out of every store ranking.
        self.finite.append(torch.isfinite(blocks).all(1).cpu() & torch.isfinite(stored).all(1))
        self.rows.append(stored)

    def commit(self, storage: Storage, shard, seqs, docs, doc_of, decoder, window_len: int,
               order: Sequence[int] | None = None) -> Commit:
        """Write and commit the shard's store file; ``order``: the window of each captured row, in capture
        order (the scoring pass's; None: window order), so the file's rows are in window order."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.basis.width, dtype=self.dtype)
        if rows.shape[0] != len(seqs):
            raise RuntimeError(f"store: {rows.shape[0]} rows captured for {len(seqs)} windows of {shard.shard_id}")
        finite = torch.cat(self.finite) if self.finite else torch.zeros(0, dtype=torch.bool)
        if order is not None:
            where = torch.as_tensor(list(order), dtype=torch.long)
            if sorted(where.tolist()) != list(range(len(seqs))):
                raise RuntimeError(f"store: the capture order of {shard.shard_id} is not one of its {len(seqs)} windows")
            rows = rows.new_empty(rows.shape).index_copy_(0, where, rows)
            finite = finite.new_empty(finite.shape).index_copy_(0, where, finite)
        windows = []
        for i, seq in enumerate(seqs):
            w = decoder.window(docs[doc_of[i]][1], seq, window_len)
            windows.append([doc_of[i], seq.window, len(seq.input_ids), w.text, w.char_start, w.char_end])
        tensors = {"rows": rows.contiguous(), "finite": finite.to(torch.uint8)}
        metadata = {
            "store": json.dumps(self.target.key, sort_keys=True),
            "layers": json.dumps([[n, o, i] for n, (o, i) in zip(self.basis.layers, self.basis.shapes())]),
            "shard_id": shard.shard_id,
            "doc_ids": json.dumps([d for d, _ in docs]),
            "windows": json.dumps(windows),
            "char_spans": decoder.method,
        }
        url = self.target.shard_url(storage.root, shard.shard_id)
        storage.write_safetensors(url, tensors, metadata)
        return commit_file(storage, url, shard_id=shard.shard_id, num_windows=len(seqs),
                           num_tokens=sum(len(s.input_ids) for s in seqs))


def read_basis(storage: Storage, url: str, key: dict) -> StoreBasis:
    """The committed basis at ``url``, refused (`StoreMismatchError`) when written under another key."""
    tensors, meta = storage.read_safetensors(url, committed_checksum(storage, url))
    _check_key(url, key, meta)
    return StoreBasis.from_tensors(json.loads(meta["layers"]), tensors)


def _check_key(url: str, key: dict, meta: dict) -> None:
    found = json.loads(meta.get("store", "{}"))
    why = StoreKey(**key).mismatch(found)
    if why is not None:
        raise StoreMismatchError(
            f"gradient store file {url} was written under {why}; a store is never mixed across factors, dims or "
            "dtypes: write this run's store (score.source=model store.enabled=true) or use the settings it was "
            "written with"
        )


# ---- Ray tasks (no model) -------------------------------------------------------------------


def write_basis_task(root: str, options: dict, factors_url: str, basis_url: str, key: dict) -> Commit:
    """The kept eigendirections of the factors at ``factors_url``, committed at ``basis_url``."""
    storage = Storage(root, options)
    done = already_committed(storage, basis_url)
    if done is not None:
        return done
    # Each layer read once, as it is reduced (not the whole file in memory).
    factors = EKFACFactors.from_buffer(storage.read_mapped(factors_url, committed_checksum(storage, factors_url)))
    basis = StoreBasis.from_factors(factors, key["dim"])
    metadata = {"store": json.dumps(key, sort_keys=True), "layers": json.dumps(basis.layers)}
    storage.write_safetensors(basis_url, basis.to_tensors(), metadata)
    return commit_file(storage, basis_url)


def write_query_blocks_task(root: str, options: dict, basis_url: str, queries_url: str, out_url: str,
                            key: dict) -> Commit:
    """The queries' blocks ``(Q, width)`` (float32) from their preconditioned gradients, committed at ``out_url``."""
    storage = Storage(root, options)
    done = already_committed(storage, out_url)
    if done is not None:
        return done
    basis = read_basis(storage, basis_url, key)
    tensors, meta = storage.read_safetensors(queries_url, committed_checksum(storage, queries_url))
    queries = QueryGradients.from_tensors(meta["query_ids"].split("\n"), tensors)
    blocks = basis.query_blocks(queries).to(torch.float32)
    storage.write_safetensors(out_url, {"blocks": blocks}, {"query_ids": "\n".join(queries.query_ids),
                                                            "store": json.dumps(key, sort_keys=True)})
    return commit_file(storage, out_url, num_queries=len(queries.query_ids))


def score_store_shard(job: StoreShardJob) -> Commit:
    """One shard's result (`pipeline.shard_result` format) from its store file: top-k windows, documents, layers."""
    storage = Storage(job.storage_root, job.storage_options)
    done = already_committed(storage, job.out_url)
    if done is not None:
        return done
    started = time.perf_counter()
    q_tensors, q_meta = storage.read_safetensors(job.blocks_url, committed_checksum(storage, job.blocks_url))
    _check_key(job.blocks_url, job.key, q_meta)
    query_ids, blocks = q_meta["query_ids"].split("\n"), q_tensors["blocks"]
    tensors, meta = storage.read_safetensors(job.store_url, committed_checksum(storage, job.store_url))
    _check_key(job.store_url, job.key, meta)
    rows, finite = tensors["rows"], tensors["finite"].to(torch.bool)
    if rows.shape[1] != blocks.shape[1]:
        raise StoreMismatchError(
            f"gradient store file {job.store_url} holds rows of {rows.shape[1]} numbers, the queries' blocks "
            f"{blocks.shape[1]}; rewrite the store (score.source=model store.enabled=true)"
        )
    windows, doc_ids = json.loads(meta["windows"]), json.loads(meta["doc_ids"])
    shard = job.shard
    scores = store_scores(rows, blocks)  # (windows, Q)
    keys = torch.tensor([seq_key(shard.index, i) for i in range(rows.shape[0])], dtype=torch.int64)
    acc = TopK(len(query_ids), job.top_k)
    doc_acc = DocumentTopK(shard.index, len(query_ids), job.top_k)
    as64 = scores.to(torch.float64)
    for i, w in enumerate(windows):
        doc_acc.add(w[0], as64[i] if finite[i] else None)
    if finite.any():
        acc.update(scores[finite], keys[finite])
    doc_top = doc_acc.finish()
    table = _result_rows(acc, doc_top, doc_acc.num_windows, query_ids, windows, doc_ids, rows, blocks,
                         json.loads(meta["layers"]), job.token_rows)
    storage.write_bytes(job.out_url, shard_parquet_bytes(table, meta.get("char_spans", "")))
    nonfinite = [f"{doc_ids[w[0]]}#{w[1]}" for w, ok in zip(windows, finite.tolist()) if not ok]
    return commit_file(
        storage, job.out_url, shard_id=shard.shard_id, num_docs=shard.row_end - shard.row_start,
        num_windows=len(windows), num_tokens=sum(w[2] for w in windows), num_rows=table.num_rows,
        nonfinite_windows=nonfinite[:100], num_nonfinite_windows=len(nonfinite),
        seconds=round(time.perf_counter() - started, 3), top_k=job.top_k, queries_id=job.queries_id,
    )


def _result_rows(acc, doc_acc, num_windows, query_ids, windows, doc_ids, rows, blocks, layers, token_rows):
    """Window, document and layer rows as the model pass writes them (`ShardWorker._result_table`); no token rows."""
    out = ShardRows()
    for q, query_id in enumerate(query_ids):
        for polarity, rank, score, key in ranked(acc, q):
            d, window, _, text, c0, c1 = windows[key & 0xFFFFFFFF]
            out.add(kind=WINDOW, query_id=query_id, polarity=polarity, rank=rank, doc_id=doc_ids[d], window=window,
                    score=score, seq_key=key, text=text, char_start=c0, char_end=c1)
        for polarity, rank, score, key in ranked(doc_acc, q):
            d = key & 0xFFFFFFFF
            out.add(kind=DOCUMENT, query_id=query_id, polarity=polarity, rank=rank, doc_id=doc_ids[d], score=score,
                    seq_key=key, num_windows=num_windows[d])
    offsets, start = [], 0
    for _, o, i in layers:
        offsets.append((start, start + o * i))
        start += o * i
    for q, query_id in enumerate(query_ids):
        for polarity, rank, _, key in ranked(acc, q, token_rows):
            local = key & 0xFFFFFFFF
            d, window = windows[local][:2]
            shares = layer_scores(rows[local : local + 1], blocks[q : q + 1], offsets)[0, 0].to(torch.float64)
            for index, ((name, _, _), share) in enumerate(zip(layers, shares.tolist())):
                out.add(kind=LAYER, query_id=query_id, polarity=polarity, rank=rank, doc_id=doc_ids[d],
                        window=window, seq_key=key, position=index, text=name, score=share)
    return out.table()


def shortlist_digest(windows, documents) -> str:
    """What a two-stage shard result was rescored for: its shortlisted window and document indices."""
    return digest({"windows": sorted(windows), "documents": sorted(documents)})


# ---- the driver -----------------------------------------------------------------------------


def store_key(ctx) -> StoreKey:
    s = ctx.cfg.store
    return StoreKey(ctx.factors_id, s.dim, s.dtype)


def store_id_for_results(cfg, factors_id: str) -> str | None:
    """The store id that keys results scored from the store (``score.source=store``); None for exact results."""
    if cfg.score.source != "store":
        return None
    return StoreKey(factors_id, cfg.store.dim, cfg.store.dtype).id


def _tasks(ctx, fn: Callable, calls: list[tuple], desc: str) -> list:
    from pipeline.cluster import run_tasks

    c = ctx.cfg.cluster
    return run_tasks(fn, calls, desc, slots=2 * c.num_workers, max_retries=c.max_restarts,
                     stall_timeout_s=c.stall_timeout_s)


def _options(ctx) -> dict:
    return dict(ctx.cfg.storage.options)


def ensure_basis(ctx, key: StoreKey) -> StoreTarget:
    """The store's kept directions, computed from the factors by one Ray task unless committed; the write target."""
    root = ctx.storage.root
    basis_url = layout.store_basis(root, key.id)
    key_url = layout.store_key_file(root, key.id)
    if not ctx.storage.exists(key_url):
        ctx.storage.write_json(key_url, key.to_json())
    if read_file_commit(ctx.storage, basis_url) is None:
        _tasks(ctx, write_basis_task, [(root, _options(ctx), ctx.factors_url, basis_url, key.to_json())],
               "store: basis")
    return StoreTarget(key.id, key.to_json(), basis_url)


def store_target(ctx) -> StoreTarget | None:
    """The store the score pass writes (``store.enabled``), its basis ready; None when the store is off."""
    if not ctx.cfg.store.enabled:
        return None
    return ensure_basis(ctx, store_key(ctx))


def _other_stores(storage: Storage, key: StoreKey) -> list[str]:
    """Stores on storage written under other settings, each as ``id (what differs)``."""
    out = []
    for url in storage.glob(layout.url(storage.root, "store", "*", "key.json")):
        try:
            found = storage.read_json(url)
        except (FileNotFoundError, ValueError):
            continue
        why = key.mismatch(found)
        if why is not None:
            out.append(f"{url.rstrip('/').split('/')[-2]} ({why})")
    return out


def score_from_store(ctx) -> list[Commit]:
    """The score stage with ``score.source=store``: every shard's result from its store file by Ray tasks, no model.

    A store written under other factors, ``store.dim`` or ``store.dtype`` is refused (`StoreMismatchError`,
    naming what differs). Shards whose store file is missing or fails verification are named in a WARNING
    and rebuilt by the model's score pass (with the store on), then scored from the store like the rest
    (``counts.store_shards_rebuilt``). With ``store.rescore`` the store's results are a shortlist that the
    model rescores (`rescore_shortlist`).
    """
    cfg = ctx.cfg
    ctx.counts.update(store_id=store_key(ctx).id, store_shards_rebuilt=0)
    if cfg.store.rescore:
        return rescore_shortlist(ctx)
    todo = [s for s in ctx.shards if not _current(ctx, s)]
    ctx.counts.update(shards_scored=len(todo), shards_reused=len(ctx.shards) - len(todo))
    if not todo:
        return []
    log.info("score from store %s: %d shard(s), %d reused", ctx.counts["store_id"], len(todo),
             len(ctx.shards) - len(todo))
    return _store_results(ctx, todo, ctx.shard_url, cfg.score.top_k, "score: from store")


def _current(ctx, shard, shortlist: str | None = None) -> bool:
    """Whether the shard's result for this run's scoring is committed (for ``shortlist``, when two-stage)."""
    done = read_file_commit(ctx.storage, ctx.shard_url(shard))
    current = (done is not None and done.queries_id == ctx.queries_id and done.top_k == ctx.cfg.score.top_k
               and done.shortlist == shortlist and not ctx.cfg.run.overwrite)
    if current:
        log.info("skip committed %s", ctx.shard_url(shard))
    return current


def _store_results(ctx, shards: list, out_url: Callable, top_k: int, desc: str) -> list[Commit]:
    """The store's top ``top_k`` of each of ``shards`` at ``out_url(shard)``, by Ray tasks without the model."""
    from pipeline.cluster import run_units

    storage, root, cfg = ctx.storage, ctx.storage.root, ctx.cfg
    key = store_key(ctx)
    missing = [s for s in shards if read_file_commit(storage, layout.store_shard(root, key.id, s.shard_id)) is None]
    if missing and len(missing) == len(ctx.shards):
        others = _other_stores(storage, key)
        where = f"; storage holds store(s) written under other settings: {'; '.join(others[:3])}" if others else ""
        raise StoreMismatchError(
            f"score.source=store: no gradient store {key.id} for factors {key.factors}, store.dim={key.dim}, "
            f"store.dtype={key.dtype}{where}; stores are never mixed across settings: write this one with "
            "score.source=model store.enabled=true"
        )
    target = ensure_basis(ctx, key)
    if missing:
        log.warning("gradient store %s lacks %d shard(s) (missing or failing verification), e.g. %s: rebuilt by the "
                    "model's score pass", key.id, len(missing), [s.shard_id for s in missing[:5]])
        exact = layout.shared_shard_result
        exact_key = replace(ctx.results_key, store=None, rescore=0, top_k=top_k).id  # exact results, keyed as such
        calls = [("score", (s, ctx.queries_url, exact(root, exact_key, s.shard_id), top_k, ctx.queries_id, False,
                            target)) for s in missing]
        run_units(ctx.workers, calls, "store: rebuild", stall_timeout_s=cfg.cluster.stall_timeout_s)
        ctx.counts["store_shards_rebuilt"] = len(missing)
    blocks_url = layout.store_queries(root, key.id, ctx.queries_id)
    if read_file_commit(storage, blocks_url) is None:
        _tasks(ctx, write_query_blocks_task,
               [(root, _options(ctx), target.basis_url, ctx.queries_url, blocks_url, key.to_json())], "store: queries")
    jobs = [(StoreShardJob(root, _options(ctx), key.to_json(), s, target.shard_url(root, s.shard_id), blocks_url,
                           out_url(s), top_k, ctx.queries_id),) for s in shards]
    return _tasks(ctx, score_store_shard, jobs, desc)


def shortlist_key(ctx):
    """The results key of two-stage's first stage: the store's results at top-k ``store.rescore``."""
    return replace(ctx.results_key, rescore=0, top_k=ctx.cfg.store.rescore)


def shortlist_url(ctx, shard) -> str:
    """Where two-stage scoring keeps the store's top ``store.rescore`` of a shard: a store result at that top-k."""
    return layout.shared_shard_result(ctx.storage.root, shortlist_key(ctx).id, shard.shard_id)


def global_shortlist(ctx) -> dict[str, tuple[list[int], list[int]]]:
    """Per shard id: the local indices of its windows and documents in the store's global top ``store.rescore``.

    Folded from every shard's committed store result at top-k ``store.rescore``
    (`pipeline.merge.RankingFold`, a batch of shards at a time), each rekeyed to
    its index in this run's listing: the global top ``m`` windows and documents per
    query and polarity, the same set whichever run scored the shard results.
    """
    import io

    from pipeline.merge import RankingFold
    from pipeline.results import rekey
    from pipeline.shard_result import read_shard_result

    storage, m = ctx.storage, ctx.cfg.store.rescore
    fold = RankingFold(m, extra=("seq_key",))
    for start in range(0, len(ctx.shards), 64):
        tables = []
        for shard in ctx.shards[start : start + 64]:
            url = shortlist_url(ctx, shard)
            data = storage.read_bytes(url, committed_checksum(storage, url))
            tables.append(rekey(read_shard_result(io.BytesIO(data), (WINDOW, DOCUMENT)), shard.index))
        fold.add(tables)
    by_index: dict[int, tuple[set[int], set[int]]] = {s.index: (set(), set()) for s in ctx.shards}
    for part, keys in ((0, fold.windows().column("seq_key").to_pylist()), (1, fold.document_keys())):
        for key in keys:
            by_index[key >> 32][part].add(key & 0xFFFFFFFF)
    return {s.shard_id: (sorted(by_index[s.index][0]), sorted(by_index[s.index][1])) for s in ctx.shards}


def rescore_shortlist(ctx) -> list[Commit]:
    """Two-stage scoring (``store.rescore = m``): the store's global top ``m``, rescored exactly by the model.

    1. every shard's store top ``m`` per query and polarity (windows and documents; committed, reused by
       any run with the same store, queries and ``m``); 2. their global top ``m`` (`global_shortlist`);
    3. per shard, the model scores every window of each document that the global shortlist names or holds
       a window of (`ShardWorker.score` with ``shortlist``), so a document's score sums all its windows, and
       keeps the top-k. A shard's result records its shortlist's digest and is reused only for the same
       shortlist (a grown corpus changes the global top ``m``). ``counts.windows_rescored`` of
       ``windows_in_rescored_shards`` is the share of a full pass the model did.
    """
    from pipeline.cluster import run_units

    cfg, storage = ctx.cfg, ctx.storage
    first = [s for s in ctx.shards if read_file_commit(storage, shortlist_url(ctx, s)) is None]
    if first:
        log.info("two-stage: the store's top %d of %d shard(s)", cfg.store.rescore, len(first))
        _store_results(ctx, first, lambda s: shortlist_url(ctx, s), cfg.store.rescore, "score: shortlist from store")
    selection = global_shortlist(ctx)
    digests = {sid: shortlist_digest(*sel) for sid, sel in selection.items()}
    todo = [s for s in ctx.shards if not _current(ctx, s, digests[s.shard_id])]
    ctx.counts.update(shards_scored=len(todo), shards_reused=len(ctx.shards) - len(todo),
                      store_shortlists_scored=len(first))
    if not todo:
        return []
    # replace=True: a committed result for another shortlist (the corpus changed) is replaced, marker last.
    calls = [("score", (s, ctx.queries_url, ctx.shard_url(s), cfg.score.top_k, ctx.queries_id, True,
                        None, selection[s.shard_id])) for s in todo]
    log.info("two-stage: the model rescores the global top %d per query and polarity in %d shard(s)",
             cfg.store.rescore, len(todo))
    commits = run_units(ctx.workers, calls, "score: rescore shortlist", stall_timeout_s=cfg.cluster.stall_timeout_s)
    scored = sum(c.num_windows_scored or 0 for c in commits)
    total = sum(c.num_windows or 0 for c in commits)
    ctx.counts.update(windows_rescored=scored, windows_in_rescored_shards=total)
    log.info("two-stage: %d of %d windows (%.1f%%) scored by the model", scored, total, 100 * scored / max(total, 1))
    return commits


@dataclass
class StoreSize:
    """Bytes of a committed store: its shard files, windows and tokens (the figures' bytes per window/token)."""

    files: int = 0
    bytes: int = 0
    windows: int = 0
    tokens: int = 0
    shard_ids: list[str] = field(default_factory=list)


def store_size(storage: Storage, store_id: str) -> StoreSize:
    out = StoreSize()
    for url in storage.glob(layout.url(layout.store_dir(storage.root, store_id), "shards", "*.safetensors")):
        c = read_file_commit(storage, url, verify=False)
        if c is None:
            continue
        out.files += 1
        out.bytes += c.size_bytes or 0
        out.windows += c.num_windows or 0
        out.tokens += c.num_tokens or 0
        out.shard_ids.append(c.shard_id)
    return out
