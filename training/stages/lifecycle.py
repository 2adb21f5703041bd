"""One lifecycle for every stage (DESIGN.md rule 3: stages are idempotent):

    hash the config and inputs -> skip when a manifest with the same hashes exists -> invalidate the old manifest
    -> run the body -> write the manifest last

A stage does its read-only checks first (they compute its inputs, and bad input must fail before anything is
written), then hands its body to `run_stage`. The body returns an `Outcome`; `run_stage` writes it as the manifest.
In a distributed job every rank runs the body but only rank 0 invalidates and writes (`StageRun.writes`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from training import storage
from training.config import StageConfig, config_hash
from training.manifest import finished, invalidate, manifest_path, write_manifest


@dataclass
class Outcome:
    """What a stage body hands back to be written as its manifest."""

    outputs: dict
    metrics: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)           # the compact summary the orchestrator passes on
    mlflow_run_id: str | None = None                       # set: the manifest is also logged to this MLflow run


@dataclass
class StageRun:
    """One run of a stage instance, as its body sees it."""

    cfg: StageConfig
    name: str
    config_hash: str
    inputs: dict
    started: float
    writes: bool        # rank 0 (or a single process): invalidates and writes the manifest

    @property
    def directory(self) -> Path:
        return storage.stage_dir(self.cfg.run_root, self.name)

    @property
    def uri(self) -> str:
        return storage.stage_uri(self.cfg.run_root, self.name)

    def tracking(self, enabled: bool = True):
        """The stage's MLflow run (context manager; yields None where disabled and on ranks other than 0)."""
        from training.tracking import stage_run

        return stage_run(self.cfg, self.name, self.config_hash, enabled=enabled and self.writes)


def is_rank_zero() -> bool:
    """Rank 0 of a torchrun job (or a single process); known from the environment before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def run_stage(cfg: StageConfig, inputs: dict, body: Callable[[StageRun], Outcome], *,
              skip_when_done: bool = True, still_valid: Callable[[dict], bool] = lambda manifest: True) -> dict | None:
    """Run `body` as the stage instance `cfg` names (`cfg.stage_name`: see the module docstring); returns the
    manifest (None on ranks other than 0).

    skip_when_done=False: stages whose idempotence lives elsewhere (register and promote ask the registry) always
    run; `still_valid(manifest)` can veto a skip (e.g. the outputs the manifest names are gone)."""
    chash = config_hash(cfg)
    name = cfg.stage_name
    if skip_when_done:
        done = finished(cfg.run_root, name, chash, inputs)
        if done is not None and still_valid(done):
            print(f"{name}: already done with config {chash}; skipping", flush=True)
            return done
    stage = StageRun(cfg, name, chash, inputs, time.time(), writes=is_rank_zero())
    if stage.writes:   # an old manifest must never vouch for the files this run is about to replace
        invalidate(cfg.run_root, name)
    outcome = body(stage)
    if not stage.writes:
        return None
    manifest = write_manifest(cfg.run_root, name, config_hash=chash, inputs=inputs, outputs=outcome.outputs,
                              metrics=outcome.metrics, started=stage.started, result=outcome.result)
    if outcome.mlflow_run_id:
        from training.tracking import log_artifact_to_run

        log_artifact_to_run(cfg, outcome.mlflow_run_id, manifest_path(cfg.run_root, name))
    return manifest
