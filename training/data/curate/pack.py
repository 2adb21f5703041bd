"""Tokenise and pack: a shard's candidates into a megatron-core indexed dataset, then the merge of every shard.

`PackCandidates` is the last filter of a source's chain in a shard: it tokenizes with DeepSeek's tokenizer (HF
`tokenizers`, batched), turns the source's FIM share into fill-in-the-middle documents (`training.data.fim`: at
packing, per document, from a hash of seed and document id, so any shard count writes the same tokens), appends EOD,
and writes `{kind}.bin/.idx` with megatron-core's `IndexedDatasetBuilder` plus one JSON line per document
(`{kind}.docs.jsonl`: order, content key, id, tokens, FIM mode). A document whose raw text encodes to a control token
(a literal end-of-sentence or FIM marker inside the data) would corrupt document boundaries and is set aside, except
the repository and file-name markers a repository sample is built from.

`merge_source` reads every shard's candidates in order and keeps a document unless an earlier one has the same
content key (across shards and sources) or the near-dedup clustering removed it: exactly what one shard would keep.
It counts the kept documents per FIM mode (psm, spm, none) for the manifest.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from training import tokenizer
from training.data import fim
from training.data.curate.steps import TOKEN_BATCH

PROGRESS_SECONDS = 5.0
REPOSITORY_TOKENS = (tokenizer.REPO_NAME_BEGIN, tokenizer.REPO_NAME_END, tokenizer.FILE_NAME_BEGIN,
                     tokenizer.FILE_NAME_END, tokenizer.FILE_BEGIN, tokenizer.FILE_END)


def megatron_builder():
    """megatron-core's dataset writer and the token dtype for this vocabulary. Imported late: megatron.core takes
    ~10 s to import, and its TE/Apex fallback warnings are expected on CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return IndexedDatasetBuilder, DType.optimal_dtype(tokenizer.VOCAB_SIZE_PADDED)


class PackCandidates(BaseFilter):
    name = "tokenize + pack"

    def __init__(self, prefix: Path, label: str, exclusion_writer=None, fim_options: dict | None = None,
                 vocab_merges: int | None = None):
        super().__init__(exclusion_writer=exclusion_writer, batch_size=TOKEN_BATCH)
        self.vocab_merges = vocab_merges   # None: DeepSeek's full tokenizer (training/vocabulary.py)
        self.prefix, self.label = Path(prefix), label
        self.fim_options = dict(fim_options or {})   # rate, spm_rate, seed of `fim.document_ids` (a FimConfig's dump)
        self.builder = self.docs_file = None

    def _open(self) -> None:
        builder_cls, self.dtype = megatron_builder()
        tok = tokenizer.load_tokenizer(self.vocab_merges)
        self.encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self.eod = tokenizer.eod_id()
        # Lookup tables: one numpy gather per document instead of a set scan.
        self.is_control = np.zeros(tokenizer.VOCAB_SIZE_PADDED, dtype=bool)   # indexed by id (a subset's ids too)
        self.is_control[list(tokenizer.control_token_ids())] = True
        self.is_repository_marker = np.zeros(tokenizer.VOCAB_SIZE_PADDED, dtype=bool)
        self.is_repository_marker[[tokenizer.token_id(t) for t in REPOSITORY_TOKENS]] = True
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.builder = builder_cls(str(self.prefix) + ".bin", dtype=self.dtype)
        self.docs_file = open(str(self.prefix) + ".docs.jsonl", "w")
        self.documents = self.tokens = 0
        self.started = self.last_report = time.time()

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """A FIM document's prefix, middle and suffix, each encoded on its own with this step's vocabulary."""
        return [e.ids for e in self.encode_batch(texts, add_special_tokens=False)]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:   # datatrove's abstract API; batches go below
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self.builder is None:
            self._open()
        results = []
        # No special tokens from the tokenizer (DeepSeek's adds none anyway); fim.document_ids adds FIM and EOD.
        for doc, encoding in zip(batch, self.encode_batch([d.text for d in batch], add_special_tokens=False)):
            ids = np.asarray(encoding.ids, dtype=self.dtype)
            control = self.is_control[ids]
            if doc.metadata.get("repository"):
                control &= ~self.is_repository_marker[ids]   # the markers a repository sample is built from
            if control.any():
                results.append((False, "control_token"))
                continue
            packed = fim.document_ids(doc.text, doc.id, plain_ids=encoding.ids, encode=self._encode_pieces,
                                      **self.fim_options)   # EOD last
            ids = np.asarray(packed.ids, dtype=self.dtype)
            self.builder.add_document(ids, [len(ids)])
            doc.metadata["token_count"] = len(ids)
            self.docs_file.write(json.dumps({"order": doc.metadata["order"], "key": doc.metadata["content_key"],
                                             "id": doc.id, "tokens": len(ids), "fim": packed.mode}) + "\n")
            self.documents += 1
            self.tokens += len(ids)
            results.append(True)
        self._progress()
        return results

    def run(self, data, rank: int = 0, world_size: int = 1):
        yield from super().run(data, rank, world_size)
        if self.builder is None:   # no document reached this step: still write an (empty) dataset
            self._open()
        self.builder.finalize(str(self.prefix) + ".idx")
        self.docs_file.close()

    def _progress(self) -> None:
        now = time.time()
        if now - self.last_report >= PROGRESS_SECONDS:
            self.last_report, elapsed = now, now - self.started
            print(f"curate {self.label}: {self.documents} packed ({self.documents / elapsed:.0f} docs/s), "
                  f"{self.tokens:,} tokens ({self.tokens / elapsed:,.0f}/s)", flush=True)


def read_candidates(shard_dirs: list[Path], label: str) -> list[tuple[int, int, int, str, int, str]]:
    """(order, shard position, row in that shard's dataset, content key, tokens, FIM mode) of every shard's
    candidates."""
    rows = []
    for position, directory in enumerate(shard_dirs):
        with open(directory / f"{label}.docs.jsonl") as f:
            for row, line in enumerate(f):
                r = json.loads(line)
                rows.append((r["order"], position, row, r["key"], r["tokens"], r.get("fim", fim.NONE)))
    rows.sort()
    return rows


def merge_source(label: str, shard_dirs: list[Path], prefix: Path, seen_keys: set[str], near_duplicates) -> dict:
    """Write one source's final dataset; `seen_keys` carries content keys across sources (first source wins)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    builder_cls, dtype = megatron_builder()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = builder_cls(str(prefix) + ".bin", dtype=dtype)
    datasets: dict[int, IndexedDataset] = {}   # opened on first use: an empty .bin cannot be memory-mapped
    candidates = read_candidates(shard_dirs, label)
    counts = {"candidates": len(candidates), "candidate_tokens": sum(c[4] for c in candidates),
              "exact_duplicates": 0, "exact_duplicate_tokens": 0, "near_duplicates": 0, "near_duplicate_tokens": 0,
              "documents": 0, "tokens": 0, "fim": dict.fromkeys(fim.MODES, 0)}
    for order, position, row, key, tokens, mode in candidates:
        if key in seen_keys:
            counts["exact_duplicates"] += 1
            counts["exact_duplicate_tokens"] += tokens
            continue
        seen_keys.add(key)
        if order in near_duplicates:
            counts["near_duplicates"] += 1
            counts["near_duplicate_tokens"] += tokens
            continue
        if position not in datasets:
            datasets[position] = IndexedDataset(str(shard_dirs[position] / label))
        ids = np.asarray(datasets[position][row], dtype=dtype)
        builder.add_document(ids, [len(ids)])
        counts["documents"] += 1
        counts["tokens"] += len(ids)
        counts["fim"][mode] += 1
    builder.finalize(str(prefix) + ".idx")
    return counts
