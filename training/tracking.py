"""MLflow: one run per stage, opened by rank 0 only, tagged with the pipeline run and the config hash."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from training.config import StageConfig


def tracking_uri(cfg: StageConfig) -> str:
    """Config wins, then $MLFLOW_TRACKING_URI, then a sqlite store beside the run."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from training.storage import local_dir

    return f"sqlite:///{local_dir(cfg.run_root) / 'mlflow.db'}"


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else key, sub, out)
    else:
        out[prefix] = value
    return out


@contextlib.contextmanager
def stage_run(cfg: StageConfig, stage: str, config_hash: str, enabled: bool = True):
    """Yield an active MLflow run for this stage (or None where `enabled` is False, e.g. ranks other than 0)."""
    if not enabled:
        yield None
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"seekflow.stage": stage, "seekflow.profile": cfg.profile, "seekflow.config_hash": config_hash,
            "seekflow.run_root": str(cfg.run_root), **cfg.tracking.tags}
    with mlflow.start_run(run_name=f"{stage}-{cfg.profile}", tags=tags) as run:
        params = flatten("", cfg.model_dump(mode="json", exclude={"tracking"}), {})
        # MLflow caps param values at 6000 chars and a batch at 100 params.
        items = [(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        yield run


def log_artifact_to_run(cfg: StageConfig, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Log a file to a stage's MLflow run after it ended (a manifest is written once the stage's work is done)."""
    from training.registry import mlflow_client

    mlflow_client(tracking_uri(cfg)).log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_metrics(mlflow_run, metrics: dict) -> None:
    """Log numeric metrics to the active stage run (nothing when tracking is off)."""
    if mlflow_run is None:
        return
    import mlflow

    import re

    # MLflow allows letters, digits, _ - . / and spaces in metric names: "dropped.Language ID (lid)" → "…_lid_".
    mlflow.log_metrics({re.sub(r"[^\w\-./ ]", "_", k): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
