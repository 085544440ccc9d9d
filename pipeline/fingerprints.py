"""A cache of the corpus listing's per-file results, so a night does not re-read unchanged files.

Listing a corpus hashes every file's bytes (the SHA-256 in every shard id,
`pipeline.corpus`) and validates it (columns, row count, null texts, JSONL
offsets). That is a full read of the corpus each night. This cache keeps each
file's result under the *identity* the filesystem reports without reading
the file: its size and ETag on object storage, its size, inode and
modification time (ns) on a local disk. A file whose identity is unchanged
is taken from the cache; any other is read and hashed again. The identity is
only a cache key: shard ids still hash the content. An object re-uploaded
with the same bytes in one part keeps its ETag (S3's is the MD5 of the bytes)
and is taken from the cache; one whose ETag changes with the same bytes (a
multipart upload, another store's version tag) is re-hashed and keeps its ids.

One JSON object per corpus path at
``{storage.root}/corpus_fingerprints/{digest of corpus.path}.json``. It also
remembers the listings whose ids were checked unique, so an unchanged
listing skips the check; a listing with any new or changed file reads the ids
of every file. Concurrent writers are harmless: every entry is
self-consistent (identity -> what the file held), the last write wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, replace

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError

log = logging.getLogger(__name__)

FOLDER = "corpus_fingerprints"
# Entries written by another layout of this file are ignored (and rewritten).
VERSION = 1
# What the filesystem's ``info`` may name a content version by (s3: ETag; gcs: md5Hash, generation).
VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "VersionId")


def cache_url(root: str, corpus_path: str) -> str:
    """Where the cache of ``corpus_path``'s listing lives under the storage root ``root``."""
    key = hashlib.sha256(corpus_path.encode()).hexdigest()[:20]
    return f"{root.rstrip('/')}/{FOLDER}/{key}.json"


def file_identity(fs, path: str) -> dict | None:
    """What the filesystem says identifies this version of ``path``, without reading it; None if nothing does.

    Local files: size, inode and modification time in ns. Object storage: size and ETag (or the store's
    checksum or generation). Size alone is no identity (a same-size rewrite would be missed).
    """
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)
        return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
    info = fs.info(path)
    version = {k: str(info[k]) for k in VERSION_KEYS if info.get(k)}
    return {"size": info.get("size"), **version} if version else None


class FingerprintCache:
    """The listing's per-file results of earlier listings of one corpus path; ``save`` after listing.

    ``hits`` and ``misses`` count the files taken from the cache and those read again.
    """

    def __init__(self, storage, corpus_path: str):
        self.storage = storage
        self.url = cache_url(storage.root, corpus_path)
        self.corpus_path = corpus_path
        self.hits = self.misses = 0
        self._files: dict[str, dict] = {}
        self._unique_checked: list[str] = []
        self._changed = False
        try:
            data = storage.read_json(self.url) if storage.exists(self.url) else None
        except (OSError, ValueError, StorageError) as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("corpus fingerprint cache %s unreadable (%s); every file is read again", self.url, exc)
            data = None
        if data and data.get("version") == VERSION and data.get("corpus") == corpus_path:
            self._files = data.get("files", {})
            self._unique_checked = data.get("unique_checked", [])

    def get(self, url: str, identity: dict | None, columns: tuple[str, str]):
        """The cached ``(CorpusFile, first bad text)`` of ``url`` if its identity and columns are unchanged."""
        from pipeline.corpus import CorpusFile

        entry = self._files.get(url)
        if identity is None or entry is None or entry["identity"] != identity or entry["columns"] != list(columns):
            self.misses += 1
            return None
        self.hits += 1
        fields = dict(entry["file"], line_offsets=tuple(entry["file"]["line_offsets"]))
        return CorpusFile(**fields), entry.get("first_bad")

    def put(self, url: str, identity: dict | None, columns: tuple[str, str], file, first_bad: str | None) -> None:
        """Remember what listing ``url`` found (nothing when the filesystem gives no identity)."""
        if identity is None:
            return
        self._files[url] = {"identity": identity, "columns": list(columns), "file": asdict(replace(file, rel_path="")),
                            "first_bad": first_bad}
        self._changed = True

    @staticmethod
    def listing_key(files, id_column: str) -> str:
        """The digest of a listing's files and contents (what a unique-id check covered)."""
        return hashlib.sha256(json.dumps([id_column, sorted((f.url, f.fingerprint) for f in files)]).encode()).hexdigest()

    def ids_checked(self, key: str) -> bool:
        return key in self._unique_checked

    def mark_ids_checked(self, key: str) -> None:
        if key not in self._unique_checked:
            self._unique_checked = (self._unique_checked + [key])[-8:]  # the last few listings
            self._changed = True

    def save(self, urls: list[str]) -> None:
        """Write the cache, keeping only the files of this listing (removed files drop out)."""
        kept = {u: e for u, e in self._files.items() if u in set(urls)}
        if not self._changed and kept == self._files:
            return
        self.storage.write_json(self.url, {"version": VERSION, "corpus": self.corpus_path, "files": kept,
                                           "unique_checked": self._unique_checked})
        log.info("corpus fingerprints: %d file(s) from the cache, %d read; wrote %s", self.hits, self.misses, self.url)
