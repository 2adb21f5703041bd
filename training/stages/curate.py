"""Curate stage (walking skeleton): sample corpus → filter → exact dedup → tokenize → megatron indexed datasets.

For each configured source: read items from the machine's installed packages (`training.data.sample_corpus`), set
aside documents that are whitespace-only or shorter than `min_chars`, drop exact duplicates (sha256 of the
whitespace-normalised text, across all sources), tokenize with DeepSeek's tokenizer and append EOD, and write
`{stage_dir}/data/{kind}_text_document.{bin,idx}` with megatron-core's `IndexedDatasetBuilder`.

Scale-out: the work runs as `shards` shards and one merge (`training.data.shards`): a Kubernetes Indexed Job (or the
local backend's processes) runs `python -m training curate` with `SEEKFLOW_NUM_SHARDS=N` and `JOB_COMPLETION_INDEX=i`
set, one shard per process; then one plain run merges. A plain run also does any shard not done yet, so on a laptop
one command does everything. Any N keeps the same documents.

Every item a shard read is accounted for once: seen = documents + rejected + duplicates + surplus (candidates that
shards read beyond the cap). Rejects are counted per reason and the first 100 per source are sampled into `{stage_dir}/rejects/{kind}.jsonl`; a
source rejecting more than `max_reject_ratio` of what it read fails the stage. The manifest is written last; a rerun
with the same config, packages and tokenizer is skipped. MinHash, quality filters and PII come later (datatrove).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter

from training import manifest as manifests
from training import storage, tracking
from training.config import CurateConfig, config_hash
from training.data import sample_corpus, tokenizer
from training.data.shards import SHARD_MARKER, Merger, ShardWriter, shard_dir
from training.storage import sha256_file, stage_dir

STAGE = "curate"
SHARDS_ENV = "SEEKFLOW_NUM_SHARDS"       # set on shard jobs only (operators.backends.k8s_render sets the same name)
INDEX_ENV = "JOB_COMPLETION_INDEX"       # a Kubernetes Indexed Job's completion index


class CurateError(RuntimeError):
    pass


def run(cfg: CurateConfig) -> dict:
    started = time.time()
    packages = sample_corpus.installed_packages()
    inputs = {**{source.kind: sample_corpus.fingerprint(packages) for source in cfg.sources},
              "tokenizer": tokenizer.tokenizer_fingerprint()}
    chash = config_hash(cfg)
    if os.environ.get(SHARDS_ENV):
        return run_shard(cfg, _shard_index(cfg), packages, chash, inputs)

    done = manifests.finished(cfg.run_root, STAGE, chash, inputs)
    if done is not None and _outputs_exist(done):
        print(f"curate: already done ({manifests.manifest_uri(cfg.run_root, STAGE)}), skipping", flush=True)
        return done
    manifests.invalidate(cfg.run_root, STAGE)   # an old manifest must never vouch for the files rewritten below
    for index in range(cfg.shards):
        run_shard(cfg, index, packages, chash, inputs)
    return merge(cfg, chash, inputs, started)


def _shard_index(cfg: CurateConfig) -> int:
    count, index = int(os.environ[SHARDS_ENV]), os.environ.get(INDEX_ENV)
    if count != cfg.shards:
        raise CurateError(f"{SHARDS_ENV}={count} but the config says shards: {cfg.shards}")
    if index is None or not index.isdigit() or int(index) >= count:
        raise CurateError(f"{SHARDS_ENV} is set, so {INDEX_ENV} must be a shard index below {count} (got {index!r})")
    return int(index)


def run_shard(cfg: CurateConfig, index: int, packages, chash: str, inputs: dict) -> dict:
    """Shard `index` of `cfg.shards`: every source's candidates, then `shard.json` (skipped when already done)."""
    label = f"shard {index + 1}/{cfg.shards}"
    out = shard_dir(stage_dir(cfg.run_root, STAGE), index, cfg.shards)
    marker_uri = storage.uri_of(out / SHARD_MARKER, cfg.run_root)
    old = json.loads(storage.read_text(marker_uri) or "{}")
    if old.get("config_hash") == chash and old.get("inputs") == inputs:
        print(f"curate {label}: already done, skipping", flush=True)
        return old
    (out / SHARD_MARKER).unlink(missing_ok=True)
    builder_cls, dtype = _megatron_builder()
    tok = tokenizer.load_tokenizer()
    sources = {}
    for source in cfg.sources:
        writer = ShardWriter(source, out, tok, builder_cls, dtype, f"{source.kind} {label}")
        writer.consume(sample_corpus.read_source(source.kind, packages, max_file_bytes=source.max_file_bytes),
                       index, cfg.shards)
        sources[source.kind] = writer.stats()
        print(f"curate {source.kind} {label}: {writer.candidates} candidates, {writer.tokens:,} tokens; rejected "
              f"{dict(writer.rejected)}; {writer.duplicates} duplicates", flush=True)
    marker = {"shard": index, "shards": cfg.shards, "config_hash": chash, "inputs": inputs, "sources": sources}
    storage.publish(out, exclude=(SHARD_MARKER,))
    (out / SHARD_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    storage.publish(out / SHARD_MARKER)   # last: the marker vouches for the files above
    return {**marker, "result": {"shard": index, "shards": cfg.shards}}


def merge(cfg: CurateConfig, chash: str, inputs: dict, started: float) -> dict:
    """Merge every shard into the final datasets, check reject ratios, write the manifest last."""
    out = stage_dir(cfg.run_root, STAGE)
    dirs = [shard_dir(out, i, cfg.shards) for i in range(cfg.shards)]
    markers = []
    for directory in dirs:
        marker = json.loads(storage.read_text(storage.uri_of(directory / SHARD_MARKER, cfg.run_root)) or "{}")
        if marker.get("config_hash") != chash or marker.get("inputs") != inputs:
            raise CurateError(f"shard {directory.name} is missing or from another config: rerun the shards")
        storage.fetch(storage.uri_of(directory, cfg.run_root))   # an s3 run root: the shard pods' files
        markers.append(marker)
    builder_cls, dtype = _megatron_builder()
    seen_keys: set[str] = set()
    datasets, metrics = [], {}
    with tracking.stage_run(cfg, STAGE, chash) as mlflow_run:
        for source in cfg.sources:
            merger = Merger(source, dirs, out / "data" / f"{source.kind}_text_document", builder_cls, dtype, seen_keys)
            stats = _sum_shard_stats(m["sources"][source.kind] for m in markers)
            merged = merger.merge()
            merger.rejects(out / "rejects" / f"{source.kind}.jsonl")
            stats.update(documents=merged["documents"], tokens=merged["tokens"], surplus=merged["surplus"],
                         duplicates=stats["duplicates"] + merged["duplicates_across_shards"]
                         + merged["duplicates_across_sources"])
            metrics[source.kind] = stats
            print(f"curate {source.kind}: kept {stats['documents']} documents, {stats['tokens']:,} tokens; "
                  f"rejected {stats['rejected_total']} {stats['rejected']}; {stats['duplicates']} duplicates "
                  f"({cfg.shards} shard{'s' * (cfg.shards > 1)})", flush=True)
            _log_metrics(mlflow_run, source.kind, stats)   # before the ratio check: a failed run shows why
            ratio = stats["rejected_total"] / max(stats["seen"], 1)
            if ratio > cfg.max_reject_ratio:
                raise CurateError(f"source {source.kind}: rejected {stats['rejected_total']} of {stats['seen']} "
                                  f"items ({ratio:.1%}) > max_reject_ratio {cfg.max_reject_ratio:.1%}; "
                                  f"see {out / 'rejects' / (source.kind + '.jsonl')}")
            prefix = merger.prefix
            datasets.append({"kind": source.kind, "prefix": storage.uri_of(prefix, cfg.run_root),
                             "weight": source.weight, "documents": stats["documents"], "tokens": stats["tokens"],
                             "bin_sha256": sha256_file(prefix.with_suffix(".bin"))})

        documents, tokens = sum(d["documents"] for d in datasets), sum(d["tokens"] for d in datasets)
        metrics.update(documents=documents, tokens=tokens, shards=cfg.shards,
                       seconds=round(time.time() - started, 2))
        tok = tokenizer.load_tokenizer()
        vocab = {"name": tokenizer.NAME, "vocab_size": tok.get_vocab_size(), "eod_id": tokenizer.eod_id()}
        outputs = {"datasets": datasets, "tokenizer": vocab}
        storage.publish(out / "data")
        storage.publish(out / "rejects")
        manifest = manifests.write_manifest(
            cfg.run_root, STAGE, config_hash=chash, inputs=inputs, outputs=outputs, metrics=metrics, started=started,
            result={"manifest": manifests.manifest_uri(cfg.run_root, STAGE), "documents": documents,
                    "tokens": tokens})
        if mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({"documents": documents, "tokens": tokens})
            tracking.log_artifact_file(manifests.manifest_path(cfg.run_root, STAGE))
            mlflow.log_artifacts(str(out / "rejects"), artifact_path="rejects")
    print(f"curate: {documents} documents, {tokens:,} tokens in {time.time() - started:.1f} s", flush=True)
    return manifest


def _sum_shard_stats(per_shard) -> dict:
    seen = duplicates = 0
    rejected: Counter[str] = Counter()
    for stats in per_shard:
        seen += stats["seen"]
        duplicates += stats["duplicates"]
        rejected.update(stats["rejected"])
    return {"seen": seen, "rejected": dict(sorted(rejected.items())), "rejected_total": sum(rejected.values()),
            "duplicates": duplicates}


def _megatron_builder():
    """megatron-core's dataset writer and the token dtype for this vocabulary. Imported here because megatron.core
    takes ~10 s to import; its TE/Apex fallback warnings are expected on CPU and only add noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return IndexedDatasetBuilder, DType.optimal_dtype(tokenizer.load_tokenizer().get_vocab_size())


def _outputs_exist(manifest: dict) -> bool:
    datasets = manifest.get("outputs", {}).get("datasets", [])
    return all(storage.exists(d["prefix"] + suffix) for d in datasets for suffix in (".bin", ".idx"))


def _log_metrics(mlflow_run, kind: str, stats: dict) -> None:
    if mlflow_run is None:
        return
    import mlflow

    mlflow.log_metrics({f"{kind}.documents_kept": stats["documents"], f"{kind}.rejected": stats["rejected_total"],
                        f"{kind}.duplicates": stats["duplicates"], f"{kind}.tokens": stats["tokens"],
                        f"{kind}.seen": stats["seen"]})
