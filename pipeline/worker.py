"""``ShardWorker``: one model loaded once, many shards processed.

Plain Python (no Ray import): ``pipeline.cluster`` runs it as a Ray actor, and
tests and the single-process reference call it directly. Every unit it
produces is written to storage and then committed; a committed unit is
skipped, so a retried task can neither lose nor duplicate output.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from pipeline import heap, layout
from pipeline.core.forward import sequence_losses
from pipeline.core.ekfac import CovarianceSums, Eigenbases, EKFACFactors, eigendecompose, partial_sums_dtype
from pipeline.core.influence import InfluenceConfig, InfluenceEngine
from pipeline.core.queries import QueryGradients
from pipeline.core.text import (
    Batch,
    Tokenisation,
    TokenWindow,
    batches_of,
    collate,
    encode_documents,
    encode_query,
    longest_first,
    window_key,
)
from pipeline.commit import Commit, already_committed, commit_dir, commit_file, committed_checksum
from pipeline.core.topk import TopK
from pipeline.corpus import Query, Shard, read_shard
from pipeline.decoding import WindowDecoder
from pipeline.model_io import load_model_and_tokenizer, local_model_dir
from pipeline.shard_result import (
    DOCUMENT,
    LAYER,
    TOKEN,
    WINDOW,
    DocumentTopK,
    TOKEN_ROWS,
    ShardRows,
    KeptBreakdowns,
    document_indices,
    ranked,
    seq_key,
    shard_parquet_bytes,
)
from pipeline.storage import Checksum, Storage
from pipeline.store import StoreTarget, StoreWriter, read_basis, shortlist_digest

log = logging.getLogger(__name__)

# Test hook: "SHARD_INDEX:MARKER_PATH" makes the worker process exit abruptly while
# scoring that shard (after writing its data, before the commit), once.
KILL_ENV = "ATTRIBUTION_TEST_KILL_ONCE"
# A fit unit's windows are sorted longest first in pools of at least this many (whole shards; `_fit_batches`).
FIT_SORT_WINDOWS = 1024


@dataclass
class WorkerSpec:
    """Everything a worker needs, as plain values (Ray ships it to the actor)."""

    model_path: str
    model_cache_dir: str
    trust_remote_code: bool
    influence: InfluenceConfig
    id_column: str
    text_column: str
    window_len: int
    fit_batch_size: int
    score_batch_size: int
    storage_root: str
    storage_options: dict = field(default_factory=dict)
    device: str = "cpu"
    # BOS/EOS around documents and query prompts (corpus.add_bos/add_eos as the driver resolved them).
    tokenisation: Tokenisation = field(default_factory=Tokenisation)
    # Windows per (query, polarity) whose per-token and per-layer scores are kept (tokens/layers tables).
    token_rows: int = TOKEN_ROWS


class ShardWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.storage = Storage(spec.storage_root, spec.storage_options)
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        local = local_model_dir(spec.model_path, spec.model_cache_dir, spec.storage_options)
        model, self.tokenizer = load_model_and_tokenizer(local, spec.trust_remote_code)
        # Forward passes of the model so far (tests check that scoring from the gradient store runs none).
        self.forward_calls = 0
        model.register_forward_pre_hook(self._count_forward)
        self.engine = InfluenceEngine(model, spec.influence, device)
        self.pad_id = self.tokenizer.pad_token_id
        self.decoder = WindowDecoder(self.tokenizer)

    def reset(self) -> str:
        """Start over as a new worker of the same spec would (``cluster.reuse_workers``): model, engine and
        storage built again, cached queries and store basis dropped, the forward counter at zero; only the
        process (torch and transformers imported) is kept. Returns the fingerprint, as a readiness check.
        """
        self.__init__(self.spec)
        return self.fingerprint()

    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def _count_forward(self, module, args) -> None:
        self.forward_calls += 1

    def forward_count(self) -> int:
        return self.forward_calls

    def layer_specs(self) -> dict:
        return {n: s.to_json() for n, s in self.engine.layers.items()}

    # ---- data -----------------------------------------------------------------------------

    def _windows(self, shard: Shard) -> tuple[list[TokenWindow], list[str]]:
        return self._encode(self._documents(shard))

    def _fit_batches(self, shards: list[Shard]) -> Iterator[tuple[list[Batch], int]]:
        """A fit unit's batches: its shards' windows pooled, ``FIT_SORT_WINDOWS`` or more at a time (whole
        shards), each pool batched longest first (`longest_first`), with the pool's skipped documents.

        The sums do not depend on the order or the batching (sampled labels are drawn per window,
        `label_uniforms`), and batches of similar lengths pad less: pooled over the 64 windows of two
        32-document shards, the SmolLM2 benchmark's fit batches padded 11,504 tokens, against 12,040
        sorted shard by shard (10,793 real). The pool bounds the windows held at once.
        """
        pool, skipped = [], 0
        for k, shard in enumerate(shards):
            seqs, skip = self._windows(shard)
            pool.extend(seqs)
            skipped += len(skip)
            if len(pool) >= FIT_SORT_WINDOWS or k == len(shards) - 1:
                yield self._batches([pool[i] for i in longest_first(pool)], self.spec.fit_batch_size), skipped
                pool, skipped = [], 0

    def _documents(self, shard: Shard) -> list[tuple[str, str]]:
        return read_shard(shard, self.spec.id_column, self.spec.text_column, self.spec.storage_options)

    def _encode(self, docs: list[tuple[str, str]]) -> tuple[list[TokenWindow], list[str]]:
        return encode_documents(self.tokenizer, docs, self.spec.window_len, self.spec.tokenisation)

    def _query_windows(self, queries: list[Query]) -> list[TokenWindow]:
        spec = self.spec
        return [encode_query(self.tokenizer, q.id, q.prompt, q.completion, spec.window_len, spec.tokenisation)
                for q in queries]

    def _batches(self, seqs: list[TokenWindow], size: int) -> list[Batch]:
        return batches_of(seqs, size, self.pad_id)

    # ---- units ----------------------------------------------------------------------------

    def _unit(
        self, out_url: str, compute: Callable[[], tuple[Callable[[str], None], dict]], replace: bool = False,
        folder: bool = False,
    ) -> Commit:
        """One unit of work at ``out_url``: skipped when committed, else computed, written, committed.

        ``compute()`` returns ``(write, recorded)``: ``write(out_url)`` stores the
        data, then the commit with the ``recorded`` fields is written last. Returns
        the unit's commit (the existing one when skipped). ``replace``: compute
        even when committed (the new data and marker replace the old ones).
        ``folder``: the unit writes several files into the folder ``out_url``,
        committed together (`commit_dir`).
        """
        done = None if replace else already_committed(self.storage, out_url, folder)
        if done is not None:
            return done
        write, recorded = compute()
        write(out_url)
        del write  # the unit's data, held by the closure
        heap.release()
        return (commit_dir if folder else commit_file)(self.storage, out_url, **recorded)

    # ---- fitting --------------------------------------------------------------------------

    @staticmethod
    def _unit_record(shards: list[Shard]) -> dict:
        """What a fit unit's commit records of its shards: the shard's id, or the ids of several, and documents."""
        ids = {"shard_id": shards[0].shard_id} if len(shards) == 1 else {"shard_ids": [s.shard_id for s in shards]}
        return {**ids, "num_docs": sum(s.num_docs for s in shards)}

    def _nonfinite_record(self, shards: list[Shard], keys: list[int]) -> dict:
        """What a fit unit's commit records of the windows its pass left out for non-finite gradients
        (`pipeline.core.influence._finite_sequences`): their count and up to 100 ``doc_id#window``.

        Only when there are any: the shards' windows are then listed again to name them."""
        if not keys:
            return {}
        wanted = set(keys)
        named = [f"{w.doc_id}#{w.window}" for shard in shards for w in self._windows(shard)[0]
                 if window_key(w.doc_id, w.window) in wanted]
        log.warning("fit unit of %s: %d windows with non-finite gradients left out, e.g. %s",
                    shards[0].shard_id, len(keys), named[:5])
        return {"num_nonfinite_windows": len(keys), "nonfinite_windows": sorted(named)[:100]}

    def covariance(self, shards: Shard | list[Shard], out_url: str, groups: list[list[str]]) -> Commit:
        """Partial ``A``/``S`` sums of one fit unit (a shard, or consecutive shards), committed in the folder
        ``out_url``: one file per layer group of ``groups`` (`layout.group_file`), which the group's
        eigendecomposition task reads (`eigendecompose`).

        The shards' windows are pooled and batched longest first (`_fit_batches`) and added into one set
        of sums: the same sums, up to rounding, as one unit per shard added on the driver (each window's
        sampled labels depend on the window alone).
        """
        shards = [shards] if isinstance(shards, Shard) else list(shards)
        missing = set(self.engine.layers) ^ {n for g in groups for n in g}
        if missing:
            raise ValueError(f"layer groups do not cover the tracked layers exactly: {sorted(missing)[:3]}")

        def compute():
            sums, skipped = None, 0
            for batches, skip in self._fit_batches(shards):
                sums = self.engine.covariance_sums(batches, into=sums)
                skipped += skip
                del batches
            recorded = {**self._unit_record(shards), "num_tokens": sums.num_tokens, "num_skipped_docs": skipped,
                        **self._nonfinite_record(shards, sums.nonfinite)}

            def write(url: str) -> None:
                for i, names in enumerate(groups):
                    self.storage.write_safetensors(layout.url(url, layout.group_file(i, len(groups))),
                                                   sums.to_tensors(self.engine.dtype, names))

            return write, recorded

        return self._unit(out_url, compute, folder=True)

    def eigendecompose(self, parts: list[tuple[str, Checksum]], out_url: str, eigh_dtype: str) -> Commit:
        """One layer group's eigenbases, committed at ``out_url``: its covariance sums in every fit unit
        (``parts``: each unit's file of this group and its committed checksum) added in float64, then
        eigendecomposed in ``eigh_dtype`` (`pipeline.core.ekfac.eigendecompose`) on this worker's device.

        The bases are stored as decomposed; the Lambda units cast them to the dtype they rotate in.
        """

        def compute():
            cov = None
            for url, checksum in parts:
                part = CovarianceSums.from_tensors(
                    self.storage.read_safetensors(url, checksum, cast=partial_sums_dtype)[0])
                if cov is None:
                    cov = part
                else:
                    cov += part  # in place: one sum alive, not two
                del part
            if self.engine.device.type != "cpu":
                cov = CovarianceSums({n: t.to(self.engine.device) for n, t in cov.a_sum.items()},
                                     {n: t.to(self.engine.device) for n, t in cov.s_sum.items()}, cov.num_tokens)
            started = time.perf_counter()
            bases = eigendecompose(cov, getattr(torch, eigh_dtype))
            seconds = time.perf_counter() - started
            del cov
            recorded = {"num_tokens": bases.num_tokens, "seconds": round(seconds, 3)}
            return lambda url: self.storage.write_safetensors(url, bases.to_tensors()), recorded

        return self._unit(out_url, compute)

    def lambdas(self, shards: Shard | list[Shard], bases_urls: list[str], out_url: str) -> Commit:
        """Partial eigenvalue-correction sums of one fit unit in the fit's eigenbases (``bases_urls``: the
        committed files of its layer groups), as ``covariance``."""
        shards = [shards] if isinstance(shards, Shard) else list(shards)

        def compute():
            # Cast once, while parsing, to the dtype the rotation multiplies in (the captured vectors', or
            # factors.product_dtype's): LambdaSums.update would on every batch.
            dtype = self.engine.fit_products or self.engine.dtype
            tensors = {}
            for bases_url in bases_urls:
                tensors.update(self.storage.read_safetensors(
                    bases_url, committed_checksum(self.storage, bases_url),
                    cast=lambda name: dtype if name.endswith(("::Q_A", "::Q_S")) else None)[0])
            names = list(self.engine.layers)
            cast = lambda key: {n: tensors.pop(f"{n}::{key}").to(self.engine.device, dtype)  # noqa: E731
                                for n in names}
            bases = Eigenbases(cast("Q_A"), {}, cast("Q_S"), {}, 0)
            sums = None
            for batches, _ in self._fit_batches(shards):
                sums = self.engine.lambda_sums(batches, bases, into=sums)
                del batches
            recorded = {**self._unit_record(shards), "num_sequences": sums.num_sequences,
                        **self._nonfinite_record(shards, sums.nonfinite)}
            return lambda url: self.storage.write_safetensors(url, sums.to_tensors(self.engine.dtype)), recorded

        return self._unit(out_url, compute)

    # ---- queries --------------------------------------------------------------------------

    def precondition(self, queries: list[Query], factors_url: str, out_url: str, total: int | None = None) -> Commit:
        """Preconditioned (projected) query gradients of ``queries``, committed at ``out_url``.

        ``total``: the size of the whole query set when ``queries`` is one slice
        of it; its memory is checked (``QueryMemoryError``) before any work.
        """

        def compute():
            self.engine.check_query_memory(total or len(queries))
            # Read layer by layer as preconditioning asks for them (bases copied out in the engine's dtype, Lambda
            # as stored, each moved to the engine's device once): one layer's factors held at a time.
            factors = EKFACFactors.from_buffer(
                self.storage.read_mapped(factors_url, committed_checksum(self.storage, factors_url)),
                self.engine.dtype, device=self.engine.device,
            )
            seqs = self._query_windows(queries)
            grads = self.engine.query_gradients(
                self._batches(seqs, self.spec.score_batch_size), factors, [q.id for q in queries]
            )
            recorded = {"num_queries": len(queries), "query_ids": [q.id for q in queries]}
            metadata = {"query_ids": "\n".join(grads.query_ids)}
            return lambda url: self.storage.write_safetensors(url, grads.to_tensors(), metadata), recorded

        return self._unit(out_url, compute)

    def join_queries(self, part_urls: list[str], out_url: str) -> Commit:
        """The query set's gradients at ``out_url``: the committed parts (slices of queries) in order.

        A worker joins them, not the driver: workers hold the query set anyway
        to score, and keep this copy (no second read for this worker's shards).
        """

        def compute():
            grads = QueryGradients.concat([self._read_queries(u) for u in part_urls])
            query_ids = grads.query_ids
            recorded = {"num_queries": len(query_ids), "query_ids": query_ids}
            metadata = {"query_ids": "\n".join(query_ids)}

            def write(url: str) -> None:
                self.storage.write_safetensors(url, grads.to_tensors(), metadata)
                self._queries = (url, self._in_engine_dtypes(grads))

            return write, recorded

        return self._unit(out_url, compute)

    def describe_queries(self, queries: list[Query]) -> list[dict]:
        """Per query: ``log_prob`` = log p(completion | prompt) under the model and ``num_completion_tokens``.

        The query as it is attributed (`encode_query`: the prompt cut from the
        left to fit the window); one forward pass without gradients.
        """
        seqs = self._query_windows(queries)
        out = []
        with torch.no_grad():
            for batch in self._batches(seqs, self.spec.score_batch_size):
                batch = batch.to(self.engine.device)
                losses = sequence_losses(self.engine.model, batch, "data", None, self.spec.influence.precision)
                out.extend(-float(x) for x in losses.to(torch.float64).cpu())
        return [{"log_prob": lp, "num_completion_tokens": s.num_targets} for lp, s in zip(out, seqs)]

    def _load_queries(self, url: str) -> QueryGradients:
        cached = getattr(self, "_queries", None)
        if cached is not None and cached[0] == url:
            return cached[1]
        grads = self._in_engine_dtypes(self._read_queries(url))
        self._queries = (url, grads)
        return grads

    def _in_engine_dtypes(self, grads: QueryGradients) -> QueryGradients:
        """On the engine's device; dense in its dtype, low-rank factors in the dtype its products use."""
        return grads.to(self.engine.device, self.engine.dtype, self.engine.query_factors_dtype)

    def _read_queries(self, url: str) -> QueryGradients:
        """Committed query gradients at ``url`` (verified against their commit's checksum), as stored."""
        tensors, meta = self.storage.read_safetensors(url, committed_checksum(self.storage, url))
        return QueryGradients.from_tensors(meta["query_ids"].split("\n"), tensors)

    # ---- scoring --------------------------------------------------------------------------

    def score(
        self, shard: Shard, queries_url: str, out_url: str, top_k: int, queries_id: str | None = None,
        replace: bool = False, store: StoreTarget | None = None,
        shortlist: tuple[list[int], list[int]] | None = None,
    ) -> Commit:
        """Top-k proponents and opponents per query within one shard, committed at ``out_url``.

        ``queries_id`` and ``top_k`` are recorded in the commit so the driver can tell a stale result;
        ``replace`` rescores a committed shard (``run.overwrite``). ``store``: the pass also writes the
        shard's gradient store file (`pipeline.store`) unless committed, rescoring the shard to get it.
        ``shortlist``: ``(windows, documents)``, local indices (two-stage, ``store.rescore``): only every
        window of each document named, or holding a window named, is scored, so every document ranked
        has all its windows summed; the commit records the shortlist's digest.
        """
        store_url = store.shard_url(self.storage.root, shard.shard_id) if store is not None else None
        if store_url is not None and already_committed(self.storage, store_url) is not None:
            store = None
        replace = replace or store is not None

        def compute():
            started = time.perf_counter()
            queries = self._load_queries(queries_url)
            docs = self._documents(shard)
            seqs, skipped = self._encode(docs)
            doc_of = document_indices(docs, seqs)
            chosen = range(len(seqs)) if shortlist is None else self._selected(shortlist, doc_of, len(docs))
            # Scored longest first (less padding); results are keyed by position, so the order changes nothing.
            indices = longest_first(seqs, chosen)
            acc = TopK(len(queries.query_ids), top_k)
            doc_acc = DocumentTopK(shard.index, len(queries.query_ids), top_k, Counter(doc_of[i] for i in indices))
            nonfinite: list[str] = []
            # Low-rank queries: token and layer shares come from the scoring pass itself (no second pass).
            kept = KeptBreakdowns(self.spec.token_rows) if queries.left and self.spec.token_rows > 0 else None
            writer = StoreWriter(store, self._store_basis(store)) if store is not None else None
            with self.engine.observing_captures(writer.add if writer else None):
                self._score_windows(shard, seqs, queries, acc, doc_acc, doc_of, nonfinite, kept, indices)
            tokens = sum(len(s.input_ids) for s in seqs)
            if writer is not None:
                writer.commit(self.storage, shard, seqs, docs, doc_of, self.decoder, self.spec.window_len, indices)
            table = self._result_table(acc, doc_acc.finish(), doc_acc.num_windows, queries, seqs, docs, doc_of, kept)

            def write(url: str) -> None:
                self.storage.write_bytes(url, shard_parquet_bytes(table, self.decoder.method))
                self._maybe_die(shard)

            recorded = {
                "shard_id": shard.shard_id,
                "num_docs": shard.row_end - shard.row_start,
                "num_windows": len(seqs),
                "num_windows_scored": len(indices),
                "num_tokens": tokens,
                "num_rows": table.num_rows,  # rows of every kind (windows, documents, tokens, layers)
                "skipped_docs": skipped[:100],
                "num_skipped_docs": len(skipped),
                "nonfinite_windows": nonfinite[:100],
                "num_nonfinite_windows": len(nonfinite),
                "seconds": round(time.perf_counter() - started, 3),
                "top_k": top_k,
                "queries_id": queries_id,
                "shortlist": None if shortlist is None else shortlist_digest(*shortlist),
                "scoring_products": self.engine.products_name,
            }
            return write, recorded

        return self._unit(out_url, compute, replace)

    def _store_basis(self, store: StoreTarget):
        cached = getattr(self, "_basis", None)
        if cached is None or cached[0] != store.basis_url:
            self._basis = (store.basis_url, read_basis(self.storage, store.basis_url, store.key))
        return self._basis[1]

    @staticmethod
    def _selected(shortlist: tuple[list[int], list[int]], doc_of: list[int], num_docs: int) -> list[int]:
        """The windows to rescore: every window of each document the ``shortlist`` names or holds a window of."""
        windows, documents = shortlist
        if max(windows, default=-1) >= len(doc_of) or max(documents, default=-1) >= num_docs:
            raise ValueError(f"the shortlist names windows or documents this shard does not have ({len(doc_of)} "
                             f"windows, {num_docs} documents); was it scored under another tokenisation?")
        keep = set(documents) | {doc_of[w] for w in windows}
        return [i for i, d in enumerate(doc_of) if d in keep]

    def _score_windows(self, shard, seqs, queries, acc, doc_acc, doc_of, nonfinite, kept, indices) -> None:
        """The scoring loop: the windows ``indices`` of ``seqs``, batched in that order, into the accumulators."""
        indices = list(indices)
        for start in range(0, len(indices), self.spec.score_batch_size):
            locals_ = indices[start : start + self.spec.score_batch_size]
            chunk = [seqs[i] for i in locals_]
            batch = collate(chunk, self.pad_id)
            if kept is not None:
                scores, per_layer, per_token = self.engine.score_breakdown(batch, queries)
            else:
                scores = self.engine.score_batch(batch, queries)
            keys = torch.tensor([seq_key(shard.index, i) for i in locals_], dtype=torch.int64)
            finite = torch.isfinite(scores).all(dim=1).cpu()
            on_cpu = scores.detach().to("cpu", torch.float64)
            for i, local in enumerate(locals_):
                doc_acc.add(doc_of[local], on_cpu[i] if finite[i] else None)
            if not finite.all():
                # Reported, never scored as zero: these windows are left out of the ranking.
                bad = [f"{chunk[i].doc_id}#{chunk[i].window}" for i in (~finite).nonzero().flatten().tolist()]
                log.warning("shard %s: non-finite gradients for %s; left out of the ranking", shard.shard_id, bad)
                nonfinite.extend(bad)
                scores, keys = scores[finite.to(scores.device)], keys[finite]
            if len(keys):
                acc.update(scores, keys)
            if kept is not None:
                kept.update(acc, locals_, per_layer, per_token)

    def _result_table(
        self,
        acc: TopK,
        doc_acc: TopK,
        num_windows: dict[int, int],
        queries: QueryGradients,
        seqs: list[TokenWindow],
        docs: list[tuple[str, str]],
        doc_of: list[int],
        kept: KeptBreakdowns | None = None,
    ) -> pa.Table:
        """The shard's result rows (`pipeline.shard_result`): windows with their text, documents, tokens, layers.

        Token and layer shares come from ``kept`` (the scoring pass's) when given, else from one more pass.
        """
        rows = ShardRows()
        decoded = {}
        for q, query_id in enumerate(queries.query_ids):
            for polarity, rank, score, key in ranked(acc, q):
                local = key & 0xFFFFFFFF
                seq = seqs[local]
                if local not in decoded:
                    decoded[local] = self.decoder.window(docs[doc_of[local]][1], seq, self.spec.window_len)
                w = decoded[local]
                rows.add(kind=WINDOW, query_id=query_id, polarity=polarity, rank=rank, doc_id=seq.doc_id,
                         window=seq.window, score=score, seq_key=key, text=w.text, char_start=w.char_start,
                         char_end=w.char_end)
            for polarity, rank, score, key in ranked(doc_acc, q):
                d = key & 0xFFFFFFFF
                rows.add(kind=DOCUMENT, query_id=query_id, polarity=polarity, rank=rank, doc_id=docs[d][0],
                         score=score, seq_key=key, num_windows=num_windows[d])
        self._token_rows(rows, acc, queries, seqs, decoded, kept)
        return rows.table()

    def _token_rows(self, rows: ShardRows, acc: TopK, queries: QueryGradients, seqs: list[TokenWindow],
                    decoded: dict, kept: KeptBreakdowns | None) -> None:
        """Token and layer rows of the ``token_rows`` strongest windows per (query, polarity).

        A token's share is its score summed over layers, a layer's its score
        summed over tokens: from ``kept`` (the scoring pass) or, without it,
        from one more forward and backward pass over those windows only.
        """
        wanted = {}  # local window index -> [(q, polarity, rank, key)]
        for q in range(len(queries.query_ids)):
            for polarity, rank, _, key in ranked(acc, q, self.spec.token_rows):
                wanted.setdefault(key & 0xFFFFFFFF, []).append((q, polarity, rank, key))
        shares = kept.shares if kept is not None else self._breakdowns(wanted, queries, seqs)
        layer_names = list(self.engine.layers)
        for local in sorted(wanted):
            seq, w = seqs[local], decoded[local]
            n = len(seq.input_ids)
            for q, polarity, rank, key in wanted[local]:
                per_layer, per_token = shares[(local, q)]
                common = dict(query_id=queries.query_ids[q], polarity=polarity, rank=rank, doc_id=seq.doc_id,
                              window=seq.window, seq_key=key)
                for t, (token, share) in enumerate(zip(w.tokens, per_token[:n].tolist())):
                    rows.add(kind=TOKEN, position=t, token_id=token.token_id, text=token.text,
                             special=token.special, char_start=token.char_start, char_end=token.char_end,
                             score=share, **common)
                for index, (name, share) in enumerate(zip(layer_names, per_layer.tolist())):
                    rows.add(kind=LAYER, position=index, text=name, score=share, **common)

    def _breakdowns(self, wanted: dict, queries: QueryGradients, seqs: list[TokenWindow]) -> dict:
        """``{(local, q): (per_layer (L,), per_token (T,))}`` for ``wanted``, from one more pass over those windows."""
        out = {}
        locals_ = sorted(wanted)
        for start in range(0, len(locals_), self.spec.score_batch_size):
            chunk = locals_[start : start + self.spec.score_batch_size]
            batch = collate([seqs[i] for i in chunk], self.pad_id)
            scores = self.engine.token_scores(batch, queries).detach().to("cpu", torch.float64)  # (B, Q, L, T)
            for b, local in enumerate(chunk):
                for q, *_ in wanted[local]:
                    out[(local, q)] = (scores[b, q].sum(1), scores[b, q].sum(0))
        return out

    def _maybe_die(self, shard: Shard) -> None:
        spec = os.environ.get(KILL_ENV, "")
        if not spec:
            return
        index, marker = spec.split(":", 1)
        if int(index) == shard.index and not os.path.exists(marker):
            open(marker, "w").close()
            log.warning("test hook: killing worker process while scoring shard %s", shard.shard_id)
            os._exit(1)
