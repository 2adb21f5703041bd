"""The `register` stage: the final pretrain checkpoint becomes a version of `seekflow-<profile>` in the MLflow
registry, with its lineage as tags and the alias `candidate`.

A version carries: the release checkpoint (artifact `checkpoint/`, verified against its complete.json before it is
registered), the sha256 of that complete.json as the tag `seekflow.release_sha256` (what every later download of the
version must match: training.registry), its Hugging Face DeepseekV3 export (artifact `hf/`, what the standard
ecosystem serves), lineage tags (data manifest hash, config hash, parent version, DAG run id,
git commit) and, when the evaluate stage scored this checkpoint, its results as `seekflow.eval.<suite>.<metric>`.
Idempotent by a lineage key (the pretrain result it registers + the model name): re-running the same pipeline run
finds the version it already created instead of adding a duplicate.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from training import registry, storage
from training.config import RegisterConfig
from training.config.registry import registered_model_name
from training.manifest import manifest_hash, read_manifest
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.tracking import tracking_uri

LINEAGE_KEY = "seekflow.lineage_key"


def model_name(cfg: RegisterConfig) -> str:
    return registered_model_name(cfg.model_name, cfg.profile)


def run(cfg: RegisterConfig) -> dict:
    pretrain = read_manifest(storage.stage_uri(cfg.run_root, cfg.upstream("pretrain")))
    checkpoint_uri = cfg.checkpoint or pretrain["outputs"]["release_checkpoint"]
    uri = tracking_uri(cfg)
    # s3: downloaded; a torn, missing or altered one (any file's sha256 differs from its complete.json): a clear
    # error naming the file, before anything is written
    downloads = storage.local_dir(cfg.run_root, create=False) / cfg.stage_name / "checkpoints"
    checkpoint = registry.resolve_release(checkpoint_uri, tracking_uri=uri, into=downloads).path
    inputs = {"pretrain_manifest_hash": manifest_hash(pretrain), "checkpoint": checkpoint_uri}
    evaluation = _evaluation_of(cfg.run_root, cfg.upstream("evaluate"), checkpoint_uri)
    registry.check_tracking_server(uri)
    # Always runs: the registry is its memory (a version with this lineage key is found, not registered again).
    return run_stage(cfg, inputs, lambda stage: register(cfg, stage, pretrain, checkpoint, evaluation),
                     skip_when_done=False)


def register(cfg: RegisterConfig, stage: StageRun, pretrain: dict, checkpoint: Path, evaluation: dict) -> Outcome:
    import mlflow

    name, checkpoint_uri = model_name(cfg), stage.inputs["checkpoint"]
    lineage_key = hashlib.sha256(
        f"{name}|{stage.inputs['pretrain_manifest_hash']}|{checkpoint_uri}".encode()).hexdigest()[:24]
    client = registry.mlflow_client(tracking_uri(cfg))
    with stage.tracking() as run_:
        version = _existing_version(client, name, lineage_key)
        if version is None:
            mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
            mlflow.log_dict(pretrain, "lineage/pretrain_manifest.json")
            hf_tags = _log_hf_export(checkpoint, stage.directory, run_) if cfg.export_hf else {}
            if not client.search_registered_models(filter_string=f"name = '{name}'"):
                client.create_registered_model(name, description="seekflow: DeepSeek-style model checkpoints")
            curate_hash = pretrain["inputs"].get("data_manifest_hash", "")
            tags = {
                LINEAGE_KEY: lineage_key,
                "seekflow.data_manifest_hash": curate_hash,
                "seekflow.config_hash": pretrain["config_hash"],
                "seekflow.pretrain_manifest_hash": stage.inputs["pretrain_manifest_hash"],
                "seekflow.pretrain_run_id": str(pretrain["outputs"].get("mlflow_run_id")),
                "seekflow.final_loss": f"{pretrain['metrics'].get('final_loss', float('nan')):.6f}",
                "seekflow.checkpoint_format": "megatron-core dist_checkpointing (model only)",
                **registry.release_tags(checkpoint),
                "seekflow.parent_version": cfg.parent_version or _parent_version(client, name, pretrain) or "none",
                "seekflow.parent_ref": str((pretrain["outputs"].get("parent") or {}).get("uri") or "none"),
                "seekflow.trained_by": cfg.upstream("pretrain"),
                **_data_tags(pretrain["outputs"].get("data")),
                **_parents_tags(client, name, pretrain["outputs"].get("parents")),
                **_pruning_tags(pretrain["outputs"].get("pruning")),
                "seekflow.git_commit": _git_commit(),
                **hf_tags,
                **{f"seekflow.{k}": v for k, v in cfg.tracking.tags.items()},
            }
            created = client.create_model_version(name, source=f"{run_.info.artifact_uri}/checkpoint",
                                                  run_id=run_.info.run_id, tags=tags,
                                                  description=f"{cfg.upstream('pretrain')} of profile {cfg.profile}")
            version = created.version
            print(f"{stage.name}: created {name} version {version}", flush=True)
        else:
            print(f"{stage.name}: {name} version {version} already holds this checkpoint; not registering again",
                  flush=True)
        # also when the version existed: evaluate may have run since
        registry.tag_version(client, name, str(version), registry.eval_tags(evaluation))
        client.set_registered_model_alias(name, cfg.alias, str(version))
        print(f"{stage.name}: alias {cfg.alias!r} -> {name} v{version}", flush=True)
        outputs = {"model_name": name, "version": str(version), "alias": cfg.alias, "lineage_key": lineage_key,
                   "mlflow_run_id": run_.info.run_id}
    return Outcome(outputs, {}, {k: outputs[k] for k in ("model_name", "version", "alias")})


def _parent_version(client, name: str, trained: dict) -> str | None:
    """The registered version the training stage started from (code_cpt, long_context record `outputs.parent`): named
    by its reference, else found by the sha256 of its release marker (a pipeline passes the release path)."""
    parent = trained["outputs"].get("parent") or {}
    if parent.get("version"):
        same = parent.get("model_name") in (None, name)
        return str(parent["version"]) if same else f"{parent['model_name']}/{parent['version']}"
    sha = parent.get("release_sha256")
    if not sha:
        return None
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(registry.RELEASE_SHA256_TAG) == sha:
            return str(version.version)
    return None


def _parents_tags(client, name: str, parents: dict | None) -> dict[str, str]:
    """A stage with several inputs (compress: the fine-tuned model and its pre-trained parent): each one's reference
    and registered version, as `seekflow.parent.<role>_ref` / `_version`."""
    tags = {}
    for role, lineage in (parents or {}).items():
        tags[f"seekflow.parent.{role}_ref"] = str(lineage.get("uri") or "none")
        version = _parent_version(client, name, {"outputs": {"parent": lineage}})
        tags[f"seekflow.parent.{role}_version"] = version or "none"
    return tags


def _pruning_tags(pruning: dict | None) -> dict[str, str]:
    """A pruned release's sparsity and non-zero parameters (compress)."""
    if not pruning:
        return {}
    return {"seekflow.sparsity": f"{pruning['sparsity']:.6f}", "seekflow.pruning": pruning["structure"],
            "seekflow.nonzero_params": str(pruning["nonzero_params"]),
            "seekflow.total_params": str(pruning["total_params"])}


def _data_tags(data: dict | None) -> dict[str, str]:
    """The conversations a post-training stage learnt from (sft's files, distill's kept traces): lineage. A stage
    whose data has no URI (grpo's generated prompts) gets none."""
    if not data or "uri" not in data:
        return {}
    return {"seekflow.data_uri": str(data["uri"]), "seekflow.data_sha256": str(data.get("sha256", "none"))}


def _existing_version(client, name: str, lineage_key: str) -> str | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{LINEAGE_KEY}` = '{lineage_key}'")
    return str(found[0].version) if found else None


def _evaluation_of(run_root: str, evaluate_stage: str, checkpoint_uri: str) -> dict[str, float]:
    """The evaluate stage's metrics for this very checkpoint (none when it has not run or scored another one)."""
    try:
        evaluated = read_manifest(storage.stage_uri(run_root, evaluate_stage))
    except FileNotFoundError:
        return {}
    if evaluated["inputs"].get("checkpoint") != checkpoint_uri:
        return {}
    return {k: float(v) for k, v in evaluated["metrics"].items() if not k.endswith(".seconds")}


def _log_hf_export(checkpoint: Path, workdir: Path, run_) -> dict[str, str]:
    """Export the release to Hugging Face DeepseekV3 format and log it beside the checkpoint."""
    import mlflow

    from training.export.hf import export_hf
    from training.model.release import read_model_config

    merges = read_model_config(checkpoint).vocab_merges
    if merges is not None:   # export refuses it (training/export/hf.py): say so on the version instead
        reason = f"none: a vocabulary-subset model (model.vocab_merges {merges}) has no Hugging Face form"
        print(f"register: Hugging Face export skipped ({reason})", flush=True)
        return {"seekflow.hf_export": reason}
    out = workdir / "hf"
    export_hf(checkpoint, out, overwrite=True, log=lambda line: print(f"register: {line}", flush=True))
    mlflow.log_artifacts(str(out), artifact_path="hf")
    return {"seekflow.hf_export": f"{run_.info.artifact_uri}/hf", "seekflow.hf_format": "DeepseekV3ForCausalLM"}


def _git_commit() -> str:
    """The code that trained this: $SEEKFLOW_GIT_COMMIT (images bake it in), else this checkout's HEAD."""
    if os.environ.get("SEEKFLOW_GIT_COMMIT"):
        return os.environ["SEEKFLOW_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
