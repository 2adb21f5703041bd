"""Stage manifests: written last, they are the proof a stage finished and the input of the next one.

A manifest records the stage, its config hash, its inputs (with hashes), its outputs and its metrics. A rerun whose
config hash and input hashes match an existing manifest is skipped (rule 3 of DESIGN.md: stages are idempotent).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from training.storage import stage_dir, write_json_atomic

MANIFEST = "manifest.json"


def manifest_path(run_root: str, stage: str) -> Path:
    return stage_dir(run_root, stage) / MANIFEST


def read_manifest(path: str | Path) -> dict:
    """Read a manifest (a file, or a stage directory holding one); a missing one is a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: has the stage that writes it finished?")
    return json.loads(path.read_text())


def finished(run_root: str, stage: str, config_hash: str, inputs: dict) -> dict | None:
    """The existing manifest if this stage already ran with the same config and inputs, else None."""
    path = manifest_path(run_root, stage)
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("config_hash") == config_hash and old.get("inputs") == inputs:
        return old
    return None


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
    write_json_atomic(manifest_path(run_root, stage), manifest)
    return manifest


def manifest_hash(manifest: dict) -> str:
    """A stable identity for a finished stage's result, used as lineage by later stages."""
    import hashlib

    keys = {k: manifest[k] for k in ("stage", "config_hash", "inputs", "outputs")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
