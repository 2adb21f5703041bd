"""Stage manifests: written last, they are the proof a stage finished and the input of the next one.

A manifest records the stage, its config hash, its inputs (with hashes), its outputs and its metrics. A rerun whose
config hash and input hashes match an existing manifest is skipped (rule 3 of DESIGN.md: stages are idempotent).
For an `s3://` run root the manifest is uploaded after everything else the stage published, and always read from the
object store (never from a possibly stale local mirror).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from training import storage
from training.storage import stage_dir, write_json_atomic

MANIFEST = "manifest.json"


def manifest_path(run_root: str, stage: str) -> Path:
    return stage_dir(run_root, stage) / MANIFEST


def manifest_uri(run_root: str, stage: str) -> str:
    return storage.join(run_root, stage, MANIFEST)


def read_manifest(location: str | Path) -> dict:
    """Read a manifest (a file or URI, or a stage directory / prefix holding one); a missing one is a clear error."""
    location = str(location)
    if not location.endswith(".json"):
        location = storage.join(location, MANIFEST)
    text = storage.read_text(location)
    if text is None:
        raise FileNotFoundError(f"no manifest at {location}: has the stage that writes it finished?")
    return json.loads(text)


def finished(run_root: str, stage: str, config_hash: str, inputs: dict) -> dict | None:
    """The existing manifest if this stage already ran with the same config and inputs, else None."""
    text = storage.read_text(manifest_uri(run_root, stage))
    if text is None:
        return None
    old = json.loads(text)
    if old.get("config_hash") == config_hash and old.get("inputs") == inputs:
        return old
    return None


def invalidate(run_root: str, stage: str) -> None:
    """Remove a stage's manifest before its outputs are rewritten, so a crash can never leave an old manifest
    vouching for half-written files."""
    manifest_path(run_root, stage).unlink(missing_ok=True)
    storage.delete(manifest_uri(run_root, stage))


def write_manifest(run_root: str, stage: str, *, config_hash: str, inputs: dict, outputs: dict,
                   metrics: dict, started: float, result: dict | None = None) -> dict:
    """Write the manifest last. `result` is the compact summary the orchestrator passes on (Airflow XCom)."""
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics,
        "started_at": started,
        "finished_at": time.time(),
        "result": result or {},
    }
    path = manifest_path(run_root, stage)
    write_json_atomic(path, manifest)
    storage.publish(path)
    return manifest


def manifest_hash(manifest: dict) -> str:
    """A stable identity for a finished stage's result, used as lineage by later stages."""
    import hashlib

    keys = {k: manifest[k] for k in ("stage", "config_hash", "inputs", "outputs")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
