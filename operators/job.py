"""TrainingJobOperator: run one seekflow stage through a compute backend.

The operator validates the stage config (pure Python: `training.config`), renders it to YAML, hands a JobSpec to the
backend and returns the stage's result (pushed to XCom). It never imports torch, megatron or mlflow.

On the Kubernetes backend the task is deferrable: it submits (or reattaches to) the job, then defers to
`JobCompletionTrigger`, freeing its worker slot; `execute_complete` copies the pod logs into the task log, applies
`on_finish_action` and returns the result. The job's labels carry dag/task/run/try, so a restarted worker of the same
try computes the same job name and waits for that job instead of submitting a second one.

Every task gets its stage's `retries`, `retry_delay` and `execution_timeout` (declared on the stage config's
`stage_spec`) unless the DAG author sets them, on the operator or in default_args. Airflow does not apply
execution_timeout while a task is deferred, so the trigger enforces it: it fails the job at the deadline, and
`execute_complete` collects the logs and deletes the job.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from operators.backends import JobSpec, get_backend
from operators.backends.base import JobFailed

def seekflow_home() -> Path:
    return Path(os.environ.get("SEEKFLOW_HOME", Path.home() / ".seekflow")).expanduser()


RUN_ROOT_BASE_ENV = "SEEKFLOW_RUN_ROOT_BASE"   # e.g. s3://seekflow/runs on a cluster (k8s/platform/airflow)


def default_run_root(dag_id: str, run_id: str) -> str:
    """Every DAG run writes under its own folder, so reruns of a task reuse (and resume) its outputs.

    The base is $SEEKFLOW_RUN_ROOT_BASE (a URI such as s3://bucket/runs), else $SEEKFLOW_HOME/runs on this machine."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
    base = os.environ.get(RUN_ROOT_BASE_ENV)
    if base:
        return f"{base.rstrip('/')}/{dag_id}/{safe}"
    return str(seekflow_home() / "runs" / dag_id / safe)


def task_defaults(kind: str | None, given: dict[str, Any], default_args: dict[str, Any] | None = None) -> dict:
    """The stage kind's Airflow task defaults (from its `stage_spec`) that neither the operator's own arguments
    (`given`) nor default_args set. An unknown kind (a task that is not a stage) gets StageSpec's defaults."""
    from training.config import STAGES
    from training.config.base import StageSpec

    spec = STAGES[kind].stage_spec if kind in STAGES else StageSpec(kind=kind or "task")
    values = {"retries": spec.retries, "retry_delay": timedelta(minutes=spec.retry_delay_minutes),
              "execution_timeout": timedelta(minutes=spec.timeout_minutes)}
    taken = set(given) | set(default_args or {})
    return {k: v for k, v in values.items() if k not in taken}


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



def _fail_permanently_on_bad_input(err: JobFailed) -> None:
    """A job that reported bad input fails its task without retries: every retry would fail the same way."""
    if err.permanent:
        from airflow.exceptions import AirflowFailException

        raise AirflowFailException(f"{err}\n(bad input: not retried)") from err

class TrainingJobOperator(BaseOperator):
    """Run `python -m training <kind>` with a validated config on a backend (default: this machine).

    `stage` names a stage instance of the pipeline: a stage kind, or a further instance (`pretrain_more`). How the
    job is launched (torchrun or python, GPUs, a shard phase) is what the instance's config class declares in its
    `stage_spec`, and so are its default retries and timeout (`kind` names the kind of a further instance)."""

    template_fields: Sequence[str] = ("pipeline", "backend_name", "kubernetes")
    ui_color = "#d7e8fc"

    def __init__(self, *, stage: str, pipeline: dict | Any, backend: str = "local", procs_per_node: int = 1,
                 nodes: int = 1, kubernetes: dict | None = None, deferrable: bool = True, sharded: bool = False,
                 kind: str | None = None, poll_attempts: int = 5, poll_backoff_s: float = 5.0, **kwargs):
        # Airflow's apply_defaults hands the merged DAG/task default_args in as `default_args`.
        kwargs.update(task_defaults(kind or stage, kwargs, kwargs.get("default_args")))
        super().__init__(**kwargs)
        self.stage = stage
        self.pipeline = pipeline   # {"preset": name, "overrides": {...}}, usually the validate task's XCom
        self.backend_name = backend
        self.procs_per_node = procs_per_node
        self.nodes = nodes
        self.kubernetes = kubernetes   # KubernetesSettings overrides over $SEEKFLOW_K8S_SETTINGS
        self.deferrable = deferrable   # kubernetes backend only: wait in the triggerer, not in a worker slot
        self.sharded = sharded         # the stage's shard phase: `shards` (from its config) parallel processes/pods
        self.poll_attempts = poll_attempts     # deferred wait: failed status polls in a row before the job is deleted
        self.poll_backoff_s = poll_backoff_s   # first wait after a failed poll (doubles each time)
        self._backend = None
        self._handle = None

    def build_spec(self) -> JobSpec:
        from training.config import resolve_pipeline_config, to_yaml

        pipeline = resolve_pipeline_config(self.pipeline["preset"], self.pipeline.get("overrides") or {})
        cfg = pipeline.stage(self.stage)
        declared = cfg.stage_spec
        if self.sharded and not declared.shardable:
            raise ValueError(f"stage {self.stage} has no shard phase (its config declares none)")
        return JobSpec(stage=declared.kind, config_yaml=to_yaml(cfg), launcher=declared.launcher,
                       nodes=self.nodes, procs_per_node=self.procs_per_node,
                       shards=cfg.shards if self.sharded else 1, sharded=self.sharded,
                       gpus_per_node=declared.gpus_per_node)

    def execute(self, context) -> dict:
        if self.backend_name == "kubernetes":
            return self._execute_kubernetes(context)
        spec = self.build_spec()
        self.log.info("stage %s config:\n%s", self.stage, spec.config_yaml)
        self._backend = get_backend(self.backend_name)
        try:
            result = self._backend.run(spec, log=self._log_line)
        except JobFailed as err:
            _fail_permanently_on_bad_input(err)
            raise
        self.log.info("stage %s result: %s", self.stage, result)
        return result

    # ---- kubernetes --------------------------------------------------------------------------------------------
    def kubernetes_settings(self):
        from operators.backends.k8s_settings import KubernetesSettings

        base = KubernetesSettings.from_env()
        return KubernetesSettings.model_validate({**base.model_dump(), **(self.kubernetes or {})})

    @staticmethod
    def context_labels(context) -> dict[str, str]:
        """Who the job belongs to. The try number changes on retry, not when a worker restarts mid-try."""
        ti = context["ti"]
        labels = {"dag_id": ti.dag_id, "task_id": ti.task_id, "run_id": ti.run_id, "try_number": str(ti.try_number)}
        if getattr(ti, "map_index", -1) >= 0:
            labels["map_index"] = str(ti.map_index)
        return labels

    def _kubernetes_backend(self):
        return get_backend("kubernetes", settings=self.kubernetes_settings())

    def _execute_kubernetes(self, context) -> dict:
        backend = self._kubernetes_backend()   # settings and stage config are validated before any API request
        spec = self.build_spec()
        _require_shared_run_root(spec)
        spec = dataclasses.replace(spec, labels={**spec.labels, **self.context_labels(context)})
        self.log.info("stage %s config:\n%s", self.stage, spec.config_yaml)
        self._backend = backend
        if not self.deferrable:
            try:
                result = backend.run(spec, log=self._log_line)
            except JobFailed as err:
                _fail_permanently_on_bad_input(err)
                raise
            self.log.info("stage %s result: %s", self.stage, result)
            return result
        self._handle = handle = backend.submit(spec)
        self.log.info("stage %s runs as %s %s/%s; deferring until it finishes", self.stage, handle.kind,
                      handle.namespace, handle.name)
        from operators.triggers import JobCompletionTrigger

        now = time.time()
        # Airflow does not time a deferred task (its execution_timeout covers execute() only): the trigger does.
        deadline = now + self.execution_timeout.total_seconds() if self.execution_timeout else None
        self.defer(trigger=JobCompletionTrigger(name=handle.name, namespace=handle.namespace, kind=handle.kind,
                                                settings=backend.settings.model_dump(mode="json"), started_at=now,
                                                deadline=deadline, poll_attempts=self.poll_attempts,
                                                poll_backoff_s=self.poll_backoff_s),
                   method_name="execute_complete")

    def execute_complete(self, context, event: dict) -> dict:
        """Back from the trigger: pod logs into the task log (before any deletion), cleanup, result or failure."""
        from operators.backends.kubernetes import JobHandle, KubernetesApiError

        self._backend = backend = self._kubernetes_backend()
        self._handle = handle = JobHandle(event["name"], event["namespace"], event["kind"])
        if event["status"] == "error":   # the trigger lost track of it and deleted it; a retry submits a new one
            if not event.get("deleted", True):   # the trigger could not delete it either: one more try from here
                try:
                    backend.kill(handle)
                except Exception as exc:   # noqa: BLE001 - the wait's error is the one to report
                    self.log.error("could not delete %s %s/%s: %s", handle.kind, handle.namespace, handle.name, exc)
            raise KubernetesApiError(f"waiting for {handle.kind} {handle.namespace}/{handle.name} failed: "
                                     f"{event['reason']}: {event['message']}")
        try:
            result = backend.finish(handle, event, log=self._log_line)
        except JobFailed as err:
            _fail_permanently_on_bad_input(err)
            raise
        self.log.info("stage %s result: %s", self.stage, result)
        return result

    def _log_line(self, line: str) -> None:
        self.log.info("%s", line)   # pod output may contain % or {}: never a format string

    def on_kill(self) -> None:
        if self._backend is not None:
            self.log.info("killing stage %s", self.stage)
            if self._handle is not None:
                self._backend.kill(self._handle)
            else:
                self._backend.kill()


def stage_jobs(stage: str, pipeline: Any, *, kind: str | None = None,
               backend: str = "{{ params.backend }}") -> list[TrainingJobOperator]:
    """The tasks that run one stage instance, chained: its shard phase (`<stage>_shards`) when its config declares
    one, then the stage itself (`<stage>`). `kind` is needed only for a further instance (`pretrain_more`)."""
    from training.config import STAGES

    jobs = []
    if STAGES[kind or stage].stage_spec.shardable:
        jobs.append(TrainingJobOperator(task_id=f"{stage}_shards", stage=stage, sharded=True, pipeline=pipeline,
                                        backend=backend, kind=kind))
    jobs.append(TrainingJobOperator(task_id=stage, stage=stage, pipeline=pipeline, backend=backend, kind=kind))
    for upstream, downstream in zip(jobs, jobs[1:]):
        upstream >> downstream
    return jobs


def chain_jobs(chain: tuple[str, ...], pipeline: Any, after: Any = None) -> list[TrainingJobOperator]:
    """The tasks of a chain of stage instances (`PIPELINE_CHAIN`, `POST_TRAIN_CHAIN`, ...), one after the other after
    `after` (default: `pipeline`, the validate_config task)."""
    from training.config import chain_kind

    tasks, previous = [], pipeline if after is None else after
    for name in chain:
        jobs = stage_jobs(name, pipeline, kind=chain_kind(name))
        previous >> jobs[0]
        previous = jobs[-1]
        tasks += jobs
    return tasks


def _require_shared_run_root(spec: JobSpec) -> None:
    """Pods share no disk: a stage on the cluster must read and write an object-store run root."""
    import yaml

    run_root = str(yaml.safe_load(spec.config_yaml).get("run_root", ""))
    if not run_root.startswith("s3://"):
        raise ValueError(f"stage {spec.stage}: run_root {run_root!r} is not shared by the job's pods; on the "
                         f"kubernetes backend use an s3:// run_root (Param run_root, or ${RUN_ROOT_BASE_ENV})")
