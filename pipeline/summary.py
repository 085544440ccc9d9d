"""What the main job prints at the end: where the table is, and each query's top proponents."""

from __future__ import annotations


from pipeline import layout
from pipeline.corpus import list_corpus, make_shards, read_shard
from pipeline.storage import Storage

SNIPPET_CORPUS_LIMIT = 100_000  # documents; above this no snippets are looked up


def load_table(storage: Storage, url: str):
    """The Parquet dataset (a folder) at ``url`` as one table."""
    return storage.read_parquet_dir(url)


def format_summary(
    manifest: dict, storage: Storage, show: int = 3, id_column: str = "id", text_column: str = "text",
    storage_options: dict | None = None,
) -> str:
    """Where the table is, and each query's top ``show`` proponents with a snippet of their text."""
    table = load_table(storage, manifest["attribution"]).to_pylist()
    texts: dict[str, str] = {}
    corpus_path = manifest["corpus"]["path"]
    if manifest["counts"].get("num_docs", 0) <= SNIPPET_CORPUS_LIMIT:
        wanted = {r["doc_id"] for r in table if r["polarity"] == "proponent" and r["rank"] <= show}
        options = storage_options or {}
        for shard in make_shards(list_corpus(corpus_path, id_column, text_column, options, False), 10_000):
            texts.update({i: t for i, t in read_shard(shard, id_column, text_column, options) if i in wanted})
    window_text = _window_decoder(manifest)
    lines = [f"attribution table: {manifest['attribution']}  ({len(table)} rows)",
             f"report: {layout.run_report(storage.root, manifest['run_id'])}"]
    by_query: dict[str, list[dict]] = {}
    for row in table:
        if row["polarity"] == "proponent" and row["rank"] <= show:
            by_query.setdefault(row["query_id"], []).append(row)
    for query_id in sorted(by_query):
        lines.append(f"query {query_id}: top proponents")
        for r in by_query[query_id]:
            text = texts.get(r["doc_id"], "")
            snippet = " ".join(window_text(r["doc_id"], text, r["window"]).split())[:90]
            lines.append(f"  {r['rank']:>2}. {r['doc_id']:<22} window {r['window']:<3} score {r['score']:+.4g}  {snippet}")
    return "\n".join(lines)


def _window_decoder(manifest: dict):
    """``(doc_id, text, window) -> the window's text`` when the model's tokenizer is local, else the text."""
    import os

    from pipeline.core.text import Tokenisation, encode_documents

    model_path, window = manifest["model"]["path"], manifest["config"]["corpus"]["window"]
    # Manifests written before corpus.add_bos/add_eos record no tokenisation: theirs was the default.
    tokenisation = Tokenisation(**manifest["corpus"].get("tokenisation", Tokenisation().to_json()))
    if not os.path.isdir(model_path):
        return lambda doc_id, text, w: text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def decode(doc_id: str, text: str, w: int) -> str:
        windows, _ = encode_documents(tokenizer, [(doc_id, text)], window, tokenisation)
        return tokenizer.decode(windows[w].input_ids, skip_special_tokens=True) if w < len(windows) else text

    return decode
