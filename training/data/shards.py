"""Curation as shard `i of N`, then one merge: the same config gives the same kept set for any N.

Every item of a source has an *ordinal*, its position in the source's deterministic order; shard i takes the items
whose ordinal ≡ i (mod N). A shard screens its items (empty, too short, control tokens), drops duplicates it sees
itself, tokenizes what is left and writes *candidates*: an indexed dataset plus one JSON line per document
(ordinal, content hash, id). The merge reads every shard's candidates in ordinal order, drops duplicates across
shards and sources (first occurrence wins) and keeps the first `max_documents`: exactly what one shard over all items
would keep. `max_documents` caps a source's unique documents *before* duplicates of earlier sources are removed, so a
shard may stop after `max_documents` candidates of its own: a document the merge keeps is always among them (each
candidate before it is either kept or a duplicate of a distinct kept document of the same source).

Shard layout: `{stage}/shards/{i:04d}-of-{N:04d}/{kind}.{bin,idx}`, `{kind}.docs.jsonl`, `{kind}.rejects.jsonl`,
and `shard.json` (config hash, inputs, counts) written last: a shard without it is rerun.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from training.data import sample_corpus, tokenizer
from training.data.sample_corpus import Document, Reject

BATCH_DOCS = 256          # documents per encode_batch call: enough to keep the Rust thread pool busy
REJECT_SAMPLES = 100      # reject records kept per source (per shard, and again after the merge)
PROGRESS_SECONDS = 5.0
SHARD_MARKER = "shard.json"


def shard_dir(stage_dir: Path, index: int, count: int) -> Path:
    return stage_dir / "shards" / f"{index:04d}-of-{count:04d}"


def content_key(text: str) -> str:
    """Exact-duplicate identity: sha256 of the whitespace-normalised text."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


class ShardWriter:
    """Screens, tokenizes and writes one source's candidates for one shard."""

    def __init__(self, source, out: Path, tok, builder_cls, dtype, label: str):
        self.source, self.tok, self.dtype, self.label = source, tok, dtype, label
        self.prefix = out / source.kind
        self.docs_path = out / f"{source.kind}.docs.jsonl"
        self.rejects_path = out / f"{source.kind}.rejects.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.builder = builder_cls(str(self.prefix) + ".bin", dtype=dtype)
        self.eod = tokenizer.eod_id()
        # encode_batch_fast (tokenizers >= 0.21) gives the same ids without character offsets, which we never use.
        self.encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        # Lookup table: is this token id a control token? (one numpy gather per document instead of a set scan)
        self.is_control = np.zeros(tok.get_vocab_size(), dtype=bool)
        self.is_control[list(tokenizer.control_token_ids())] = True
        self.seen_keys: set[str] = set()
        self.seen = self.candidates = self.tokens = self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.started = self.last_report = time.time()

    def consume(self, items, index: int, count: int) -> None:
        """Take the items with ordinal ≡ index (mod count) until `max_documents` candidates are written."""
        batch: list[tuple[int, Document, str]] = []
        with open(self.rejects_path, "w") as self.rejects_file, open(self.docs_path, "w") as self.docs_file:
            for ordinal, item in enumerate(items):
                if ordinal % count != index:
                    continue
                self.seen += 1
                screened = self._screen(ordinal, item)
                if screened is None:
                    continue
                batch.append(screened)
                if len(batch) >= BATCH_DOCS or self.candidates + len(batch) >= self.source.max_documents:
                    self._write(batch)
                    batch = []
                    if self.candidates >= self.source.max_documents:
                        break
            self._write(batch)
        self.builder.finalize(str(self.prefix) + ".idx")

    def _screen(self, ordinal: int, item) -> tuple[int, Document, str] | None:
        if isinstance(item, Reject):
            return self._reject(ordinal, item)
        text = item.text
        if not text.strip():
            return self._reject(ordinal, Reject(item.id, "empty"))
        if len(text.strip()) < self.source.min_chars:
            return self._reject(ordinal, Reject(item.id, "too_short", text[:sample_corpus.SAMPLE_CHARS]))
        key = content_key(text)
        if key in self.seen_keys:
            self.duplicates += 1
            return None
        self.seen_keys.add(key)
        return ordinal, item, key

    def _reject(self, ordinal: int, reject: Reject) -> None:
        self.rejected[reject.reason] += 1
        if sum(self.rejected.values()) <= REJECT_SAMPLES:
            self.rejects_file.write(json.dumps({"ordinal": ordinal, **reject.record()}, ensure_ascii=False) + "\n")
        return None

    def _write(self, batch: list[tuple[int, Document, str]]) -> None:
        if not batch:
            return
        # No special tokens from the tokenizer (DeepSeek's adds none anyway); EOD is appended explicitly.
        encodings = self.encode_batch([doc.text for _, doc, _ in batch], add_special_tokens=False)
        for (ordinal, doc, key), encoding in zip(batch, encodings):
            ids = np.asarray(encoding.ids, dtype=self.dtype)
            if self.is_control[ids].any():
                # Literal control-token text (e.g. a tokenizer's own source) would turn into an EOD or FIM marker
                # mid-document and corrupt document boundaries: set it aside.
                self._reject(ordinal, Reject(doc.id, "control_token", doc.text[:sample_corpus.SAMPLE_CHARS]))
                continue
            self.builder.add_document(np.append(ids, np.asarray([self.eod], dtype=self.dtype)), [len(ids) + 1])
            self.docs_file.write(json.dumps({"ordinal": ordinal, "key": key, "id": doc.id}) + "\n")
            self.candidates += 1
            self.tokens += len(ids) + 1
        self._progress()

    def _progress(self) -> None:
        now = time.time()
        if now - self.last_report >= PROGRESS_SECONDS:
            self.last_report = now
            elapsed = now - self.started
            print(f"curate {self.label}: {self.candidates} candidates ({self.candidates / elapsed:.0f}/s), "
                  f"{self.tokens:,} tokens ({self.tokens / elapsed:,.0f}/s), {sum(self.rejected.values())} rejected",
                  flush=True)

    def stats(self) -> dict:
        return {"seen": self.seen, "rejected": dict(sorted(self.rejected.items())), "duplicates": self.duplicates,
                "candidates": self.candidates, "tokens": self.tokens,
                "seconds": round(time.time() - self.started, 2)}


class Merger:
    """Merges one source's candidates from every shard into the final indexed dataset (see the module docstring)."""

    def __init__(self, source, shard_dirs: list[Path], prefix: Path, builder_cls, dtype, seen_keys: set[str]):
        self.source, self.shard_dirs, self.prefix = source, shard_dirs, prefix
        self.builder_cls, self.dtype, self.seen_keys = builder_cls, dtype, seen_keys

    def merge(self) -> dict:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        kind = self.source.kind
        candidates = []   # (ordinal, shard position, row in that shard's dataset, key)
        for position, directory in enumerate(self.shard_dirs):
            with open(directory / f"{kind}.docs.jsonl") as f:
                records = (json.loads(line) for line in f)
                candidates.extend((r["ordinal"], position, row, r["key"]) for row, r in enumerate(records))
        candidates.sort()
        datasets: dict[int, IndexedDataset] = {}   # opened on first use: an empty .bin cannot be memory-mapped
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = self.builder_cls(str(self.prefix) + ".bin", dtype=self.dtype)
        # The source's own cap first (its first max_documents unique candidates, which every shard layout holds),
        # then duplicates of earlier sources' documents: a README vendored as code is still a duplicate.
        own_keys: set[str] = set()
        selected, duplicates, cross_source, examined = [], 0, 0, 0
        for _, position, row, key in candidates:
            if len(selected) >= self.source.max_documents:
                break
            examined += 1
            if key in own_keys:
                duplicates += 1
                continue
            own_keys.add(key)
            selected.append((position, row, key))
        kept = tokens = 0
        for position, row, key in selected:
            if key in self.seen_keys:
                cross_source += 1
                continue
            self.seen_keys.add(key)
            if position not in datasets:
                datasets[position] = IndexedDataset(str(self.shard_dirs[position] / kind))
            ids = np.asarray(datasets[position][row], dtype=self.dtype)
            builder.add_document(ids, [len(ids)])
            kept += 1
            tokens += len(ids)
        builder.finalize(str(self.prefix) + ".idx")
        return {"documents": kept, "tokens": tokens, "duplicates_across_shards": duplicates,
                "duplicates_across_sources": cross_source,
                "surplus": len(candidates) - examined}   # read by shards beyond the cap, not needed

    def rejects(self, target: Path) -> None:
        """The first REJECT_SAMPLES rejects of this source in ordinal order, whichever shard saw them."""
        records = []
        for directory in self.shard_dirs:
            with open(directory / f"{self.source.kind}.rejects.jsonl") as f:
                records.extend(json.loads(line) for line in f)
        records.sort(key=lambda r: r["ordinal"])
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w") as f:
            for record in records[:REJECT_SAMPLES]:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
