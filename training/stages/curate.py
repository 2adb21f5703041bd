"""Curate stage: configured sources → datatrove pipelines per shard → cross-shard dedup → blended megatron datasets.

Each source runs the chain in `training.data.curate.chain` (bad input, normalisation, exact dedup, language ID,
quality, PII, decontamination, tokenize + pack, MinHash signatures). Scale-out: the work runs as `shards` shards and
one merge. A Kubernetes Indexed Job (or the local backend's processes) runs `python -m training curate` with
`SEEKFLOW_NUM_SHARDS=N` and `JOB_COMPLETION_INDEX=i` set, one shard per process; a plain run does any shard not done
yet, then merges. The merge is the cross-shard part: MinHash-LSH clustering over every shard's signatures, exact
dedup across shards and sources, then `{stage}/data/{name}_text_document.{bin,idx}` for megatron's blended dataset
builder (weights in the manifest). Any N keeps the same documents: shard i reads the items with ordinal ≡ i (mod N)
and every decision after that depends on the document alone or on its global order key. Fill-in-the-middle
(`training.data.fim`, a code source's `fim` section) is one of those per-document decisions, made while packing; the
manifest counts each source's kept documents per FIM mode (metrics `{source}.fim.{psm,spm,none}`).

Bad input (unreadable files, malformed records, empty documents) is counted per reason and sampled into
`{stage}/rejects/{source}/{step}.jsonl`; a source whose bad input exceeds `max_reject_ratio` fails the stage, naming
the source. The funnel (documents and tokens after each step) goes to the manifest, MLflow and `funnel.png`; the
manifest is written last, and a rerun with the same config and inputs is skipped.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from training import storage, tokenizer, tracking
from training.config import CurateConfig, config_hash
from training.data.curate import funnel as funnels
from training.data.curate import inputs as source_inputs
from training.data.curate import shards
from training.data.curate.shards import CurateError  # noqa: F401 - raised by this stage; tests catch it here
from training.manifest import manifest_uri
from training.stages.lifecycle import Outcome, run_stage
from training.storage import sha256_file, stage_dir
from training.vocabulary import manifest_entry

SHARDS_ENV = "SEEKFLOW_NUM_SHARDS"       # set on shard jobs only (operators.backends.k8s_render sets the same name)
INDEX_ENV = "JOB_COMPLETION_INDEX"       # a Kubernetes Indexed Job's completion index


def run(cfg: CurateConfig) -> dict:
    inputs = {**source_inputs.fingerprints(cfg.sources), "tokenizer": tokenizer.tokenizer_fingerprint()}
    if os.environ.get(SHARDS_ENV):   # one shard job of an Indexed Job: its own marker, never the stage manifest
        return shards.run_shard(cfg, _out(cfg), _shard_index(cfg), config_hash(cfg), inputs)

    def shards_then_merge(stage) -> Outcome:
        for index in range(cfg.shards):
            shards.run_shard(cfg, _out(cfg), index, stage.config_hash, inputs)
        return merge(cfg, stage.config_hash, inputs, stage.started)

    return run_stage(cfg, inputs, shards_then_merge, still_valid=_outputs_exist)


def _out(cfg: CurateConfig) -> Path:
    return stage_dir(cfg.run_root, cfg.stage_name)


def _shard_index(cfg: CurateConfig) -> int:
    count, index = int(os.environ[SHARDS_ENV]), os.environ.get(INDEX_ENV)
    if count != cfg.shards:
        raise CurateError(f"{SHARDS_ENV}={count} but the config says shards: {cfg.shards}")
    if index is None or not index.isdigit() or int(index) >= count:
        raise CurateError(f"{SHARDS_ENV} is set, so {INDEX_ENV} must be a shard index below {count} (got {index!r})")
    return int(index)


def merge(cfg: CurateConfig, chash: str, inputs: dict, started: float) -> Outcome:
    """Cross-shard dedup, the final datasets, reject samples and the funnel; the manifest is the lifecycle's."""
    from training.data.curate.pack import merge_source

    name, out = cfg.stage_name, _out(cfg)
    dirs, markers = shards.finished_shards(cfg, out, chash, inputs)
    near_duplicates = shards.near_duplicates(cfg, dirs)
    seen_keys: set[str] = set()
    datasets, metrics, all_funnels = [], {}, {}
    with tracking.stage_run(cfg, name, chash) as mlflow_run:
        for source in cfg.sources:
            funnel = funnels.sum_shards([m["sources"][source.label]["funnel"] for m in markers])
            prefix = out / "data" / f"{source.label}_text_document"
            counts = merge_source(source.label, dirs, prefix, seen_keys, near_duplicates)
            funnel = funnels.add_merge_steps(funnel, counts)
            all_funnels[source.label] = funnel
            shards.collect_rejects(dirs, source.label, out / "rejects" / source.label)
            stats = shards.source_stats(funnel, counts)
            stats["pii"] = dict(sum((Counter(m["sources"][source.label]["pii"]) for m in markers), Counter()))
            metrics[source.label] = stats
            fim = (f"; FIM at rate {source.fim.rate}: " + ", ".join(f"{k} {v}" for k, v in counts["fim"].items())
                   if source.fim.rate > 0 else "")
            print(f"curate {source.label}: kept {counts['documents']} documents, {counts['tokens']:,} tokens "
                  f"({cfg.shards} shard{'s' * (cfg.shards > 1)}){fim}; " + funnels.describe(funnel), flush=True)
            tracking.log_metrics(mlflow_run, tracking.flatten(source.label, stats, {}))   # before the check below
            ratio = stats["bad_input"] / max(stats["read"], 1)
            if ratio > cfg.max_reject_ratio:
                raise CurateError(f"source {source.label}: {stats['bad_input']} of {stats['read']} items were bad "
                                  f"input ({ratio:.1%}) > max_reject_ratio {cfg.max_reject_ratio:.1%}; see "
                                  f"{out / 'rejects' / source.label / 'bad_input.jsonl'}")
            datasets.append({"kind": source.kind, "name": source.label, "prefix": storage.uri_of(prefix, cfg.run_root),
                             "weight": source.weight, "documents": counts["documents"], "tokens": counts["tokens"],
                             "bin_sha256": sha256_file(prefix.with_suffix(".bin")),
                             "fim": {**source.fim.model_dump(), "documents": counts["fim"]}})

        documents, tokens = sum(d["documents"] for d in datasets), sum(d["tokens"] for d in datasets)
        metrics.update(documents=documents, tokens=tokens, shards=cfg.shards,
                       near_duplicates=len(near_duplicates), seconds=round(time.time() - started, 2))
        (out / "funnel.json").write_text(json.dumps(all_funnels, indent=2))
        funnels.plot(all_funnels, out / "funnel.png")
        outputs = {"datasets": datasets, "tokenizer": manifest_entry(cfg.vocab_merges), "funnel": all_funnels}
        for entry in ("data", "rejects", "funnel.json", "funnel.png"):
            storage.publish(out / entry)
        if mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({"documents": documents, "tokens": tokens})
            for entry in ("funnel.json", "funnel.png"):
                mlflow.log_artifact(str(out / entry))
            mlflow.log_artifacts(str(out / "rejects"), artifact_path="rejects")
    print(f"{name}: {documents} documents, {tokens:,} tokens in {time.time() - started:.1f} s", flush=True)
    return Outcome(outputs, metrics, {"manifest": manifest_uri(cfg.run_root, name), "documents": documents,
                                      "tokens": tokens}, mlflow_run_id=mlflow_run.info.run_id if mlflow_run else None)


def _outputs_exist(manifest: dict) -> bool:
    datasets = manifest.get("outputs", {}).get("datasets", [])
    return all(storage.exists(d["prefix"] + suffix) for d in datasets for suffix in (".bin", ".idx"))
