"""The curate stage's shards and the cross-shard half of its merge (the stage itself: training/stages/curate.py).

A shard runs every source's chain over its share of the items and ends with `shard.json`, the marker that vouches for
its files; the merge reads the markers back, clusters the MinHash signatures of every shard, gathers the reject
samples and sums the funnel into the numbers the manifest and MLflow show.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from training import storage
from training.config import CurateConfig
from training.data.curate import funnel as funnels

SHARD_MARKER = "shard.json"
GOOD_TOO_SHORT = "too_short"             # dropped by the bad-input step but a filter decision, not bad input


class CurateError(RuntimeError):
    pass


def shard_dir(out: Path, index: int, count: int) -> Path:
    return out / "shards" / f"{index:04d}-of-{count:04d}"


def run_shard(cfg: CurateConfig, out: Path, index: int, chash: str, inputs: dict) -> dict:
    """Shard `index` of `cfg.shards` under the stage folder `out`: every source's pipeline, then `shard.json`
    (skipped when already done)."""
    from training.data.curate.chain import run_source

    label = f"shard {index + 1}/{cfg.shards}"
    out = shard_dir(out, index, cfg.shards)
    marker_uri = storage.uri_of(out / SHARD_MARKER, cfg.run_root)
    old = json.loads(storage.read_text(marker_uri) or "{}")
    if old.get("config_hash") == chash and old.get("inputs") == inputs:
        print(f"curate {label}: already done, skipping", flush=True)
        return old
    (out / SHARD_MARKER).unlink(missing_ok=True)
    sources = {}
    for source_index, source in enumerate(cfg.sources):
        began = time.time()
        funnel, pii = run_source(cfg, source, source_index, out, index)
        sources[source.label] = {"funnel": funnel, "pii": pii, "seconds": round(time.time() - began, 2)}
        print(f"curate {source.label} {label}: " + funnels.describe(funnel), flush=True)
    marker = {"shard": index, "shards": cfg.shards, "config_hash": chash, "inputs": inputs, "sources": sources}
    storage.publish(out, exclude=(SHARD_MARKER,))
    (out / SHARD_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    storage.publish(out / SHARD_MARKER)   # last: the marker vouches for the files above
    return {**marker, "result": {"shard": index, "shards": cfg.shards}}


def finished_shards(cfg: CurateConfig, out: Path, chash: str, inputs: dict) -> tuple[list[Path], list[dict]]:
    """Every shard's folder (fetched, for an s3 run root) and marker; a missing or stale shard is an error."""
    dirs = [shard_dir(out, i, cfg.shards) for i in range(cfg.shards)]
    markers = []
    for directory in dirs:
        marker = json.loads(storage.read_text(storage.uri_of(directory / SHARD_MARKER, cfg.run_root)) or "{}")
        if marker.get("config_hash") != chash or marker.get("inputs") != inputs:
            raise CurateError(f"shard {directory.name} is missing or from another config: rerun the shards")
        storage.fetch(storage.uri_of(directory, cfg.run_root))   # an s3 run root: the shard pods' files
        markers.append(marker)
    return dirs, markers


def near_duplicates(cfg: CurateConfig, dirs: list[Path]) -> set[int]:
    """Order keys of the documents MinHash-LSH clustering removes, over every shard and near-dedup source."""
    from training.data.curate import minhash

    paths = [p for d in dirs for s in cfg.sources if s.near_dedup for p in sorted((d / "minhash" / s.label).glob("*.npz"))
             if not p.name.endswith(".partial.npz")]
    if not paths:
        return set()
    nd = cfg.near_dedup
    params = minhash.MinhashParams(n_grams=nd.n_grams, num_buckets=nd.num_buckets,
                                   hashes_per_bucket=nd.hashes_per_bucket, seed=nd.seed)
    keys, sigs = minhash.load_signatures(paths)
    return set(minhash.find_duplicates(keys, sigs, params).tolist())


def collect_rejects(dirs: list[Path], label: str, target: Path) -> None:
    """Per step, the shards' reject samples in the source's order: `{step}.jsonl` (decontamination: all of them)."""
    steps = sorted({p.name for d in dirs for p in (d / "rejects" / label).glob("*") if p.is_dir()})
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
        records = [json.loads(line) for d in dirs for f in sorted((d / "rejects" / label / step).glob("*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip()]
        records.sort(key=lambda r: (r.get("ordinal") is None, r.get("ordinal") or 0))
        limit = None if step == "decontaminated" else 100
        with open(target / f"{step}.jsonl", "w") as f:
            for record in records[:limit]:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def source_stats(funnel: list[dict], counts: dict) -> dict:
    """The numbers a dashboard wants per source: items read, bad input, drops per step, kept documents/tokens."""
    read = funnel[0]["documents"]
    bad = Counter(next((s["dropped"] for s in funnel if s["step"] == "bad input"), {}))
    too_short = bad.pop(GOOD_TOO_SHORT, 0)
    return {"read": read, "bad_input": sum(bad.values()), "bad_input_reasons": dict(sorted(bad.items())),
            "skipped_files": funnel[0].get("skipped_files", {}),
            "too_short": too_short, "dropped": {s["step"]: sum(s["dropped"].values()) for s in funnel if s["dropped"]},
            "exact_duplicates": counts["exact_duplicates"], "near_duplicates": counts["near_duplicates"],
            "documents": counts["documents"], "tokens": counts["tokens"],
            "fim": counts["fim"]}   # kept documents per FIM mode (psm, spm, none)
