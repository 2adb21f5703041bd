"""Small datatrove steps of the curate chain: setting bad input aside, exact dedup, and sampled reject files.

Filters follow datatrove's model: `filter()` returns True or `(False, reason)`, datatrove counts the drop per reason
in the step's stats, and the step's `exclusion_writer` (here a `SampledRejects`) keeps samples of what was dropped.
"""
from __future__ import annotations

import hashlib

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter

TOKEN_BATCH = 256          # documents per encode_batch call: enough to keep the Rust thread pool busy
REJECT_SAMPLES = 100       # reject records kept per step and shard (None keeps all, e.g. for decontamination)


class SampledRejects(JsonlWriter):
    """A step's rejects as plain JSONL (`{rank:05d}.jsonl`): the first `limit` per shard, or all when limit is None."""

    def __init__(self, output_folder: str, limit: int | None = REJECT_SAMPLES):
        super().__init__(output_folder, output_filename="${rank}.jsonl", compression=None,
                         adapter=_reject_record)
        self.limit, self.written = limit, 0

    def write(self, document: Document, rank: int = 0, **kwargs):
        if self.limit is not None and self.written >= self.limit:
            return
        self.written += 1
        super().write(document, rank, **kwargs)


def _reject_record(_writer, doc: Document) -> dict:
    meta = doc.metadata
    record = {"id": doc.id, "reason": meta.get("filter_reason") or meta.get("reject"),
              "source": meta.get("source"), "ordinal": meta.get("ordinal"), "sample": doc.text[:200]}
    for key in ("contaminated_by", "skipped_files"):   # what a reader of the rejects needs to act on them
        if key in meta:
            record[key] = meta[key]
    return record


class SetAsideBadInput(BaseFilter):
    """First step after a reader: input the reader could not read, empty and too-short documents go to the rejects;
    every kept document gets `metadata["token_count"]` (its tokens as read), so each later filter's stats report the
    tokens it kept (datatrove's `doc_len_tokens`) and the funnel shows tokens, not just documents."""

    name = "bad input"

    def __init__(self, min_chars: int, vocab_merges: int | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer=exclusion_writer, batch_size=TOKEN_BATCH)
        self.min_chars, self.vocab_merges = min_chars, vocab_merges

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if "reject" in doc.metadata:
            return False, doc.metadata["reject"]
        stripped = doc.text.strip()
        if not stripped:
            return False, "empty"
        if len(stripped) < self.min_chars:
            return False, "too_short"
        return True

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        from training import tokenizer

        results = [self.filter(doc) for doc in batch]
        kept = [doc for doc, result in zip(batch, results) if result is True]
        if kept:
            tok = tokenizer.load_tokenizer(self.vocab_merges)
            encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
            for doc, encoding in zip(kept, encode([d.text for d in kept], add_special_tokens=False)):
                doc.metadata["token_count"] = len(encoding.ids)
        return results


def content_key(text: str) -> str:
    """Exact-duplicate identity: sha256 of the whitespace-normalised text."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


class ExactDedup(BaseFilter):
    """Drops a shard's repeats of a text it has already seen (the first, smallest-ordinal copy stays); the merge
    then drops repeats across shards and sources with the same `content_key`."""

    name = "exact dedup"

    def __init__(self, exclusion_writer=None):
        super().__init__(exclusion_writer=exclusion_writer)
        self.seen: set[str] = set()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        key = content_key(doc.text)
        doc.metadata["content_key"] = key
        if key in self.seen:
            return False, "duplicate"
        self.seen.add(key)
        return True
