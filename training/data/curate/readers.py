"""Source readers: each configured source as a datatrove reader step, in a deterministic order, shard by shard.

Every item of a source has an *ordinal*, its position in the source's order (files sorted by URI, then lines or rows);
shard `rank` of `world_size` takes the items whose ordinal ≡ rank (mod world_size), so any shard count reads each item
exactly once. A document carries `metadata["source"]`, `metadata["ordinal"]` and `metadata["order"]`, a key that
orders documents across all sources (source index first): dedup keeps the document with the smallest key.

Input that cannot be read is never dropped silently (DESIGN rule 7): a malformed JSON line, invalid UTF-8, a binary
or oversized file, an unreadable object comes through as a document marked `metadata["reject"] = reason` whose text
is a sample of the raw input; the next step (`SetAsideBadInput`) counts it and writes it to the rejects.

Kinds: `package_metadata` / `package_code` (this machine's installed packages, `training.data.sample_corpus`),
`jsonl` (`*.jsonl`, `*.jsonl.gz`: one JSON object per line), `parquet` (a text column), `text` (one document per
file), `repos` (repository folders or tarballs, `training.data.curate.repos`).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from functools import lru_cache, partial
from typing import Callable, Iterator

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from training import storage
from training.data import sample_corpus

SAMPLE_CHARS = sample_corpus.SAMPLE_CHARS
ORDER_STRIDE = 1 << 40        # order = source index * ORDER_STRIDE + ordinal: sources never interleave
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def bad_input(doc_id: str, reason: str, sample: str | bytes = "") -> Document:
    """A placeholder document for input that could not be read; `SetAsideBadInput` sets it aside with `reason`."""
    if isinstance(sample, bytes):
        sample = repr(sample[:SAMPLE_CHARS])
    return Document(text=str(sample)[:SAMPLE_CHARS], id=doc_id, metadata={"reject": reason})


class SourceReader(PipelineStep):
    """Yields one source's documents for shard `rank` of `world_size` (see the module docstring)."""

    type = "📖 - READER"

    def __init__(self, source, source_index: int):
        self.name = f"read {source.label}"   # before the base __init__, which names the step's stats after it
        super().__init__()
        self.source, self.source_index = source, source_index

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        if data:
            yield from data
        for ordinal, doc in self.shard_items(rank, world_size):
            doc.metadata.update(source=self.source.label, ordinal=ordinal,
                                order=self.source_index * ORDER_STRIDE + ordinal)
            self.stat_update("bad_input" if "reject" in doc.metadata else "documents")
            for reason, count in doc.metadata.get("skipped", {}).items():   # files a repository sample left out
                self.stat_update(f"skipped_file_{reason}", value=count)
            yield doc

    def shard_items(self, rank: int, world_size: int) -> Iterator[tuple[int, Document]]:
        """(ordinal, document) of this shard's items among the source's first `max_documents`."""
        if self.source.kind == "repos":   # the repository reader shards itself: it reads only its own repositories
            from training.data.curate.repos import repository_documents

            for doc in repository_documents(storage.fetch(self.source.uri), self.source, rank=rank,
                                            world_size=world_size):
                if doc.metadata["order"] < self.source.max_documents:
                    yield doc.metadata["order"], doc
            return
        for ordinal, item in enumerate(self.items()):
            if ordinal >= self.source.max_documents:
                break
            if ordinal % world_size == rank:
                yield ordinal, item() if callable(item) else item

    def items(self) -> Iterator[Document | Callable[[], Document]]:
        """Every item of the source in order, shard-independent. File readers may yield a function that builds the
        document, so a shard does not parse the items of other shards."""
        kind = self.source.kind
        if kind == "package_metadata":
            for item in sample_corpus.package_metadata(installed_packages()):
                yield Document(text=item.text, id=item.id, metadata={})
        elif kind == "package_code":   # files are read only by the shard that owns them
            for doc_id, path in sample_corpus.package_code_files(installed_packages()):
                yield partial(_package_file, doc_id, path, self.source.max_file_bytes)
        else:
            read = {"jsonl": jsonl_items, "parquet": parquet_items, "text": text_items}[kind]
            for uri, size in storage.list_files(self.source.uri):
                yield from read(uri, size, self.source)


# ---------------------------------------------------------------------------------------------------- file kinds --
@lru_cache(maxsize=1)
def installed_packages() -> list:
    """This interpreter's distributions, scanned once per process (every shard and source reads the same list)."""
    return sample_corpus.installed_packages()


def _package_file(doc_id: str, path: Path, max_file_bytes: int) -> Document:
    item = sample_corpus.read_source_file(doc_id, path, max_file_bytes)
    if isinstance(item, sample_corpus.Reject):
        return bad_input(item.id, item.reason, item.sample or "")
    return Document(text=item.text, id=item.id, metadata={})


def _local_copy(uri: str, size: int, max_bytes: int | None) -> tuple[Path | None, Document | None]:
    """The file behind `uri` on local disk, or a bad-input document saying why it cannot be read."""
    if max_bytes is not None and size > max_bytes:
        return None, bad_input(uri, "too_large", f"{size} bytes > max_file_bytes {max_bytes}")
    try:
        return storage.fetch(uri), None
    except (storage.StorageError, OSError) as err:   # a missing object, denied access, an unreachable endpoint
        return None, bad_input(uri, "unreadable_object", str(err))


def _record_file(uri: str, size: int, suffixes: tuple[str, ...]) -> tuple[Path | None, Document | None]:
    """A record file (JSONL, Parquet) on local disk, or a bad-input document when its suffix or object is wrong."""
    if not uri.endswith(suffixes):
        return None, bad_input(uri, "unsupported_file", f"not one of {suffixes}")
    return _local_copy(uri, size, None)


def jsonl_items(uri: str, size: int, source) -> Iterator[Document]:
    """One document per JSON line; `source.text_key` holds the text, `source.id_key` (optional) the id."""
    path, bad = _record_file(uri, size, JSONL_SUFFIXES)
    if bad:
        yield bad
        return
    opener = gzip.open if uri.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield partial(_json_line, f"{uri}:{number}", raw, source)   # parsed only by its own shard
    except (OSError, EOFError) as err:   # a truncated or corrupt gzip stream: what was read before still counts
        yield bad_input(uri, "corrupt_file", str(err))


def _json_line(doc_id: str, raw: bytes, source) -> Document:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return bad_input(doc_id, "invalid_utf8", raw[max(err.start - 40, 0):err.start + 8])
    if not line.strip():
        return bad_input(doc_id, "empty", "")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return bad_input(doc_id, "malformed_json", f"{err.msg} at column {err.colno}: {line[:SAMPLE_CHARS]}")
    text = record.get(source.text_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return bad_input(doc_id, "missing_text", f"no string field {source.text_key!r}: {line[:SAMPLE_CHARS]}")
    ident = record.get(source.id_key)
    return Document(text=text, id=str(ident) if ident is not None else doc_id, metadata={})


def parquet_items(uri: str, size: int, source) -> Iterator[Document]:
    """One document per row of the `source.text_key` column."""
    import pyarrow.parquet as pq

    path, bad = _record_file(uri, size, PARQUET_SUFFIXES)
    if bad:
        yield bad
        return
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        columns = [source.text_key] + ([source.id_key] if source.id_key in parquet.schema_arrow.names else [])
        for batch in parquet.iter_batches(columns=columns, batch_size=1024):
            texts = batch.column(source.text_key).to_pylist()
            ids = batch.column(source.id_key).to_pylist() if len(columns) > 1 else [None] * len(texts)
            for text, ident in zip(texts, ids):
                row += 1
                doc_id = str(ident) if ident is not None else f"{uri}:{row}"
                if not isinstance(text, str):
                    yield bad_input(doc_id, "missing_text", f"row {row}: {source.text_key!r} is {text!r}")
                else:
                    yield Document(text=text, id=doc_id, metadata={})
    except Exception as err:   # pyarrow raises ArrowInvalid/OSError/KeyError on corrupt files and missing columns
        yield bad_input(f"{uri}:{row + 1}", "corrupt_file", f"{type(err).__name__}: {err}")


def text_items(uri: str, size: int, source) -> Iterator[Callable[[], Document]]:
    """The whole file as one document (binary, oversized and non-UTF-8 files are set aside); read by its shard only."""
    yield partial(_text_file, uri, size, source)


def _text_file(uri: str, size: int, source) -> Document:
    path, bad = _local_copy(uri, size, source.max_file_bytes)
    return bad if bad else _package_file(uri, path, source.max_file_bytes)
