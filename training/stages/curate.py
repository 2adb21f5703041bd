"""Curate stage (walking skeleton): sample corpus → filter → exact dedup → tokenize → megatron indexed datasets.

For each configured source: read items from the machine's installed packages (`training.data.sample_corpus`), set
aside documents that are whitespace-only or shorter than `min_chars`, drop exact duplicates (sha256 of the
whitespace-normalised text, across all sources), tokenize in batches with DeepSeek's tokenizer and append EOD, and
write `{stage_dir}/data/{kind}_text_document.{bin,idx}` with megatron-core's `IndexedDatasetBuilder`.

Rejects are counted per reason and the first 100 per source are sampled into `{stage_dir}/rejects/{kind}.jsonl`; a
source rejecting more than `max_reject_ratio` of what it read fails the stage. The manifest is written last; a rerun
with the same config, packages and tokenizer is skipped. MinHash, quality filters and PII come later (datatrove).
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from training import manifest as manifests
from training import tracking
from training.config import CurateConfig, config_hash
from training.data import sample_corpus, tokenizer
from training.data.sample_corpus import Document, Reject
from training.storage import sha256_file, stage_dir

STAGE = "curate"
BATCH_DOCS = 256          # documents per encode_batch call: enough to keep the Rust thread pool busy
REJECT_SAMPLES = 100      # reject records kept per source in the rejects file
PROGRESS_SECONDS = 5.0


class CurateError(RuntimeError):
    pass


def run(cfg: CurateConfig) -> dict:
    started = time.time()
    packages = sample_corpus.installed_packages()
    corpus_fp = sample_corpus.fingerprint(packages)
    inputs = {**{source.kind: corpus_fp for source in cfg.sources}, "tokenizer": tokenizer.tokenizer_fingerprint()}
    chash = config_hash(cfg)

    done = manifests.finished(cfg.run_root, STAGE, chash, inputs)
    if done is not None and _outputs_exist(done):
        print(f"curate: already done ({manifests.manifest_path(cfg.run_root, STAGE)}), skipping", flush=True)
        return done
    # A manifest must describe the files beside it: remove an old one before overwriting them, so a crash in this
    # run can never leave an old manifest vouching for half-written data.
    manifests.manifest_path(cfg.run_root, STAGE).unlink(missing_ok=True)

    out = stage_dir(cfg.run_root, STAGE)
    IndexedDatasetBuilder, dtype = _megatron_builder()
    tok = tokenizer.load_tokenizer()
    seen_hashes: set[bytes] = set()   # shared by all sources: a README vendored as code is still a duplicate
    datasets, metrics = [], {}
    with tracking.stage_run(cfg, STAGE, chash) as mlflow_run:
        for source in cfg.sources:
            print(f"curate {source.kind}: reading up to {source.max_documents} documents from "
                  f"{len(packages)} installed distributions", flush=True)
            writer = _SourceWriter(source, out, tok, IndexedDatasetBuilder, dtype, seen_hashes)
            writer.consume(sample_corpus.read_source(source.kind, packages, max_file_bytes=source.max_file_bytes))
            stats = writer.stats()
            metrics[source.kind] = stats
            print(f"curate {source.kind}: kept {stats['documents']} documents, {stats['tokens']:,} tokens; "
                  f"rejected {stats['rejected_total']} {stats['rejected']}; {stats['duplicates']} duplicates; "
                  f"{stats['seconds']:.1f} s", flush=True)
            _log_metrics(mlflow_run, source.kind, stats)   # before the ratio check: a failed run shows why
            ratio = stats["rejected_total"] / max(stats["seen"], 1)
            if ratio > cfg.max_reject_ratio:
                raise CurateError(f"source {source.kind}: rejected {stats['rejected_total']} of {stats['seen']} "
                                  f"items ({ratio:.1%}) > max_reject_ratio {cfg.max_reject_ratio:.1%}; "
                                  f"see {writer.rejects_path}")
            datasets.append({"kind": source.kind, "prefix": str(writer.prefix), "weight": source.weight,
                             "documents": stats["documents"], "tokens": stats["tokens"],
                             "bin_sha256": sha256_file(writer.prefix.with_suffix(".bin"))})

        documents, tokens = sum(d["documents"] for d in datasets), sum(d["tokens"] for d in datasets)
        metrics.update(documents=documents, tokens=tokens, seconds=round(time.time() - started, 2))
        vocab = {"name": tokenizer.NAME, "vocab_size": tok.get_vocab_size(), "eod_id": tokenizer.eod_id()}
        outputs = {"datasets": datasets, "tokenizer": vocab}
        manifest = manifests.write_manifest(
            cfg.run_root, STAGE, config_hash=chash, inputs=inputs, outputs=outputs, metrics=metrics, started=started,
            result={"manifest": str(manifests.manifest_path(cfg.run_root, STAGE)), "documents": documents,
                    "tokens": tokens})
        if mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({"documents": documents, "tokens": tokens})
            tracking.log_artifact_file(manifests.manifest_path(cfg.run_root, STAGE))
            mlflow.log_artifacts(str(out / "rejects"), artifact_path="rejects")
    print(f"curate: {documents} documents, {tokens:,} tokens in {time.time() - started:.1f} s", flush=True)
    return manifest


class _SourceWriter:
    """Filters, dedups, tokenizes and writes one source's documents into one indexed dataset."""

    def __init__(self, source, out: Path, tok, builder_cls, dtype, seen_hashes: set[bytes]):
        self.source, self.tok, self.dtype, self.seen_hashes = source, tok, dtype, seen_hashes
        self.prefix = out / "data" / f"{source.kind}_text_document"
        self.rejects_path = out / "rejects" / f"{source.kind}.jsonl"
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
        self.builder = builder_cls(str(self.prefix) + ".bin", dtype=dtype)
        self.eod = tokenizer.eod_id()
        # encode_batch_fast (tokenizers >= 0.21) gives the same ids without character offsets, which we never use:
        # ~1.5x less CPU on code than encode_batch.
        self.encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        # Lookup table: is this token id a control token? (one numpy gather per document instead of a set scan)
        self.is_control = np.zeros(tok.get_vocab_size(), dtype=bool)
        self.is_control[list(tokenizer.control_token_ids())] = True
        self.seen = self.documents = self.tokens = self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self.started = self.last_report = time.time()

    def consume(self, items) -> None:
        batch: list[Document] = []
        with open(self.rejects_path, "w") as self.rejects_file:
            for item in items:
                self.seen += 1
                document = self._screen(item)
                if document is None:
                    continue
                batch.append(document)
                # Flush early when the batch would reach the cap, so the cap is never overshot.
                if len(batch) >= BATCH_DOCS or self.documents + len(batch) >= self.source.max_documents:
                    self._write(batch)
                    batch = []
                    if self.documents >= self.source.max_documents:
                        break
            self._write(batch)
        self.builder.finalize(str(self.prefix) + ".idx")

    def _screen(self, item) -> Document | None:
        """The document if it passes filters and dedup; otherwise count it (and sample it if rejected)."""
        if isinstance(item, Reject):
            return self._reject(item)
        text = item.text
        if not text.strip():
            return self._reject(Reject(item.id, "empty"))
        if len(text.strip()) < self.source.min_chars:
            return self._reject(Reject(item.id, "too_short", text[:sample_corpus.SAMPLE_CHARS]))
        key = hashlib.sha256(" ".join(text.split()).encode()).digest()
        if key in self.seen_hashes:
            self.duplicates += 1
            return None
        self.seen_hashes.add(key)
        return item

    def _reject(self, reject: Reject) -> None:
        self.rejected[reject.reason] += 1
        if sum(self.rejected.values()) <= REJECT_SAMPLES:
            self.rejects_file.write(json.dumps(reject.record(), ensure_ascii=False) + "\n")
        return None

    def _write(self, batch: list[Document]) -> None:
        if not batch:
            return
        # No special tokens from the tokenizer (DeepSeek's adds none anyway); EOD is appended explicitly.
        encodings = self.encode_batch([doc.text for doc in batch], add_special_tokens=False)
        for doc, encoding in zip(batch, encodings):
            ids = np.asarray(encoding.ids, dtype=self.dtype)
            if self.is_control[ids].any():
                # Literal control-token text (e.g. a tokenizer's own source) would turn into an EOD or FIM marker
                # mid-document and corrupt document boundaries: set it aside.
                self._reject(Reject(doc.id, "control_token", doc.text[:sample_corpus.SAMPLE_CHARS]))
                continue
            self.builder.add_document(np.append(ids, np.asarray([self.eod], dtype=self.dtype)), [len(ids) + 1])
            self.documents += 1
            self.tokens += len(ids) + 1
        self._progress()

    def _progress(self) -> None:
        now = time.time()
        if now - self.last_report >= PROGRESS_SECONDS:
            self.last_report = now
            elapsed = now - self.started
            print(f"curate {self.source.kind}: {self.documents} documents ({self.documents / elapsed:.0f}/s), "
                  f"{self.tokens:,} tokens ({self.tokens / elapsed:,.0f}/s), {sum(self.rejected.values())} rejected",
                  flush=True)

    def stats(self) -> dict:
        return {"seen": self.seen, "rejected": dict(sorted(self.rejected.items())),
                "rejected_total": sum(self.rejected.values()), "duplicates": self.duplicates,
                "documents": self.documents, "tokens": self.tokens, "seconds": round(time.time() - self.started, 2)}


def _megatron_builder():
    """megatron-core's dataset writer and the token dtype for this vocabulary. Imported here because megatron.core
    takes ~10 s to import; its TE/Apex fallback warnings are expected on CPU and only add noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return IndexedDatasetBuilder, DType.optimal_dtype(tokenizer.load_tokenizer().get_vocab_size())


def _outputs_exist(manifest: dict) -> bool:
    datasets = manifest.get("outputs", {}).get("datasets", [])
    return all(Path(d["prefix"] + suffix).is_file() for d in datasets for suffix in (".bin", ".idx"))


def _log_metrics(mlflow_run, kind: str, stats: dict) -> None:
    if mlflow_run is None:
        return
    import mlflow

    mlflow.log_metrics({f"{kind}.documents_kept": stats["documents"], f"{kind}.rejected": stats["rejected_total"],
                        f"{kind}.duplicates": stats["duplicates"], f"{kind}.tokens": stats["tokens"],
                        f"{kind}.seen": stats["seen"]})
