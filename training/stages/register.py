"""The `register` stage: the final pretrain checkpoint becomes a version of `seekflow-<profile>` in the MLflow
registry, with its lineage as tags and the alias `candidate`.

Idempotent by a lineage key (the pretrain result it registers + the model name): re-running the same pipeline run
finds the version it already created instead of adding a duplicate.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from training.config import RegisterConfig, config_hash
from training.manifest import manifest_hash, read_manifest, write_manifest
from training.storage import stage_dir
from training.tracking import stage_run

STAGE = "register"
LINEAGE_KEY = "seekflow.lineage_key"


def model_name(cfg: RegisterConfig) -> str:
    return cfg.model_name or f"seekflow-{cfg.profile}"


def run(cfg: RegisterConfig) -> dict:
    started = time.time()
    pretrain = read_manifest(stage_dir(cfg.run_root, "pretrain"))
    checkpoint = Path(cfg.checkpoint or pretrain["outputs"]["release_checkpoint"])
    if not (checkpoint / "metadata.json").is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} is missing or incomplete (no metadata.json)")
    name = model_name(cfg)
    chash = config_hash(cfg)
    inputs = {"pretrain_manifest_hash": manifest_hash(pretrain), "checkpoint": str(checkpoint)}
    lineage_key = hashlib.sha256(f"{name}|{inputs['pretrain_manifest_hash']}|{checkpoint}".encode()).hexdigest()[:24]

    import mlflow
    from mlflow import MlflowClient

    with stage_run(cfg, STAGE, chash) as run_:
        client = MlflowClient()
        version = _existing_version(client, name, lineage_key)
        if version is None:
            mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
            mlflow.log_dict(pretrain, "lineage/pretrain_manifest.json")
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name, description="seekflow: DeepSeek-style model checkpoints")
            curate_hash = pretrain["inputs"].get("data_manifest_hash", "")
            tags = {
                LINEAGE_KEY: lineage_key,
                "seekflow.data_manifest_hash": curate_hash,
                "seekflow.config_hash": pretrain["config_hash"],
                "seekflow.pretrain_manifest_hash": inputs["pretrain_manifest_hash"],
                "seekflow.pretrain_run_id": str(pretrain["outputs"].get("mlflow_run_id")),
                "seekflow.final_loss": f"{pretrain['metrics'].get('final_loss', float('nan')):.6f}",
                "seekflow.checkpoint_format": "megatron-core dist_checkpointing (model only)",
                **{f"seekflow.{k}": v for k, v in cfg.tracking.tags.items()},
            }
            created = client.create_model_version(name, source=f"{run_.info.artifact_uri}/checkpoint",
                                                  run_id=run_.info.run_id, tags=tags,
                                                  description=f"pretrain of profile {cfg.profile}")
            version = created.version
            print(f"register: created {name} version {version}", flush=True)
        else:
            print(f"register: {name} version {version} already holds this checkpoint; not registering again",
                  flush=True)
        client.set_registered_model_alias(name, cfg.alias, str(version))
        print(f"register: alias {cfg.alias!r} -> {name} v{version}", flush=True)
        outputs = {"model_name": name, "version": str(version), "alias": cfg.alias, "lineage_key": lineage_key,
                   "mlflow_run_id": run_.info.run_id}
    return write_manifest(cfg.run_root, STAGE, config_hash=chash, inputs=inputs, outputs=outputs, metrics={},
                          started=started, result={k: outputs[k] for k in ("model_name", "version", "alias")})


def _existing_version(client, name: str, lineage_key: str) -> str | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{LINEAGE_KEY}` = '{lineage_key}'")
    return str(found[0].version) if found else None
