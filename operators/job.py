"""TrainingJobOperator: run one seekflow stage through a compute backend.

The operator validates the stage config (pure Python: `training.config`), renders it to YAML, hands a JobSpec to the
backend and returns the stage's result (pushed to XCom). It never imports torch, megatron or mlflow.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from operators.backends import JobSpec, get_backend

# Stages that run distributed under torchrun; the rest are single-process CPU jobs.
TORCHRUN_STAGES = {"pretrain"}


def seekflow_home() -> Path:
    return Path(os.environ.get("SEEKFLOW_HOME", Path.home() / ".seekflow")).expanduser()


def default_run_root(dag_id: str, run_id: str) -> str:
    """Every DAG run writes under its own folder, so reruns of a task reuse (and resume) its outputs."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
    return str(seekflow_home() / "runs" / dag_id / safe)


def pipeline_overrides(params: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """Translate the trigger form's Params into pipeline-config overrides (dotted pipeline paths)."""
    overrides: dict[str, Any] = {
        "run_root": params.get("run_root") or default_run_root(dag_id, run_id),
        "tracking.tags.dag_id": dag_id,
        "tracking.tags.dag_run_id": run_id,
    }
    if params.get("steps") is not None:
        overrides["pretrain.train.steps"] = int(params["steps"])
    overrides.update(params.get("overrides") or {})
    return overrides


class TrainingJobOperator(BaseOperator):
    """Run `python -m training <stage>` with a validated config on a backend (default: this machine)."""

    template_fields: Sequence[str] = ("pipeline", "backend_name")
    ui_color = "#d7e8fc"

    def __init__(self, *, stage: str, pipeline: dict | Any, backend: str = "local", procs_per_node: int = 1,
                 nodes: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.pipeline = pipeline   # {"preset": name, "overrides": {...}}, usually the validate task's XCom
        self.backend_name = backend
        self.procs_per_node = procs_per_node
        self.nodes = nodes
        self._backend = None

    def build_spec(self) -> JobSpec:
        from training.config import resolve_pipeline_config, to_yaml

        pipeline = resolve_pipeline_config(self.pipeline["preset"], self.pipeline.get("overrides") or {})
        cfg = pipeline.stage(self.stage)
        return JobSpec(stage=self.stage, config_yaml=to_yaml(cfg),
                       launcher="torchrun" if self.stage in TORCHRUN_STAGES else "python",
                       nodes=self.nodes, procs_per_node=self.procs_per_node)

    def execute(self, context) -> dict:
        spec = self.build_spec()
        self.log.info("stage %s config:\n%s", self.stage, spec.config_yaml)
        self._backend = get_backend(self.backend_name)
        result = self._backend.run(spec, log=self.log.info)
        self.log.info("stage %s result: %s", self.stage, result)
        return result

    def on_kill(self) -> None:
        if self._backend is not None:
            self.log.info("killing stage %s", self.stage)
            self._backend.kill()
