"""The corpus's duplicate-id check in bounded driver memory (docs/design.md#storage, issue 10.6).

Ids are appended file by file to a DuckDB table in a scratch folder on
local disk, then one ``GROUP BY`` finds an id held twice. DuckDB runs it under
``memory_limit`` and spills what does not fit to that folder, so the driver
holds one file's ids (the listing reads them) plus ``memory_limit`` and
DuckDB's own working memory, however large the corpus (measured: +140 MiB
for 1M ids in 100 files, +165 MiB for 10M). The folder takes about 16
bytes of disk per id and is removed when the check ends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import BadInputError

# DuckDB's memory for the check; past it the aggregation spills to the scratch folder.
MEMORY_LIMIT = "64MB"


class UniqueIds:
    """``add`` every file's ids, then ``check``: a `BadInputError` naming an empty or a duplicated id.

    ``check`` removes the scratch folder (so does garbage collection when an error ends the listing first).
    """

    def __init__(self, id_column: str, memory_limit: str = MEMORY_LIMIT, threads: int = 1):
        self.id_column = id_column
        self.urls: list[str] = []
        self._scratch = tempfile.TemporaryDirectory(prefix="unique-ids-")
        folder = Path(self._scratch.name)
        self._con = duckdb.connect(str(folder / "ids.duckdb"))
        self._con.execute(f"SET temp_directory = '{folder / 'spill'}'")
        self._con.execute(f"SET memory_limit = '{memory_limit}'")
        self._con.execute(f"SET threads = {int(threads)}")
        self._con.execute("SET preserve_insertion_order = false")
        self._con.execute("CREATE TABLE ids (id VARCHAR, file INTEGER)")

    def close(self) -> None:
        self._con.close()
        self._scratch.cleanup()

    def add(self, url: str, ids: pa.Array | pa.ChunkedArray | list) -> None:
        """One file's ids (any type; compared as their ``str``); an empty or null id is refused now."""
        if not isinstance(ids, (pa.Array, pa.ChunkedArray)) or not pa.types.is_string(ids.type):
            values = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
            ids = pa.array([None if v is None else str(v) for v in values], pa.string())
        if ids.null_count or pc.any(pc.equal(ids, "")).as_py():
            raise BadInputError(f"{url} has a document with an empty {self.id_column!r}")
        batch = pa.table({"id": ids, "file": pa.array([len(self.urls)] * len(ids), pa.int32())})
        self.urls.append(url)
        self._con.register("batch", batch)
        try:
            self._con.execute("INSERT INTO ids SELECT id, file FROM batch")
        finally:
            self._con.unregister("batch")

    def check(self) -> None:
        """Raise `BadInputError` naming one id held by two documents, and the files holding it."""
        try:
            found = self._con.execute(
                "SELECT id, min(file), max(file) FROM ids GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 1"
            ).fetchone()
        finally:
            self.close()
        if found:
            doc_id, first, second = found
            where = f"in {self.urls[first]}" if first == second else f"in {self.urls[first]} and {self.urls[second]}"
            raise BadInputError(f"duplicate document id {doc_id!r} ({where}); ids must be unique")
