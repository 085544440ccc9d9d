"""Shard results keyed by content, shared by every run that asks for the same scoring (docs/design.md#nightly-runs).

A shard's scored top-k depends on the shard's content (its stable id,
`pipeline.corpus.shard_id`), the preconditioned queries (``queries_id``, which
carries the factors, hence the model), ``score.top_k`` and the few settings
that change its bytes (batch size, precision, the token rows kept). They live
at ``{root}/results/{results_key}/{shard_id}.parquet`` outside any run; a run
lists the ones it merged in its manifest. A night whose corpus grew scores the
new shards only.

A shard's rows carry ``seq_key = (shard index << 32) | local index``, the
merge's tie-break, with the index the shard had in the listing it was scored
in. A reused result is merged under its index in *this* run's listing
(`rekey`), so the merged table is the one a from-scratch run would write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.identity import digest

# Bumped when a shard result's content changes meaning for the same inputs.
RESULT_FORMAT = 1

_LOCAL_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class ResultsKey:
    """What determines a shard's scored top-k besides the shard itself."""

    queries: str  # queries_id: queries, factors (model, layers, tokenisation, window), damping, projection
    top_k: int
    batch_size: int  # score.batch_size: batches of padded windows change float32 sums by rounding
    precision: str  # model.precision
    token_rows: int  # windows per (query, polarity) with token and layer rows
    format: int = RESULT_FORMAT
    # The gradient store's id when scored from it (score.source=store: truncated, never reused as exact);
    # None (left out of the JSON, so exact results keep their keys) for the model's pass.
    store: str | None = None
    # store.rescore: the store's shortlist per query and polarity that the model rescored exactly (two-stage);
    # 0 (left out of the JSON) for results of one stage.
    rescore: int = 0
    # score.product_dtype: bfloat16 rounds the scoring products' inputs, int8 quantises them; "float32" (left out
    # of the JSON, so earlier results keep their keys) multiplies in the captured vectors' own dtype.
    product_dtype: str = "float32"

    def to_json(self) -> dict:
        d = asdict(self)
        if d["store"] is None:
            del d["store"]
        if not d["rescore"]:
            del d["rescore"]
        if d["product_dtype"] == "float32":
            del d["product_dtype"]
        return d

    @property
    def id(self) -> str:
        return "r-" + digest(self.to_json())


def rekey(table: pa.Table, shard_index: int) -> pa.Table:
    """``table`` (a shard result) with the high half of every ``seq_key`` set to ``shard_index``.

    The low half (the window's or document's place in the shard) is kept, so
    the shard's own ordering is unchanged; only its place among shards moves.
    """
    if "seq_key" not in table.column_names or table.num_rows == 0:
        return table
    keys = table.column("seq_key")
    local = pc.bit_wise_and(keys, pa.scalar(_LOCAL_MASK, keys.type))
    new = pc.bit_wise_or(local, pa.scalar(shard_index << 32, keys.type))
    return table.set_column(table.column_names.index("seq_key"), table.schema.field("seq_key"), new)
