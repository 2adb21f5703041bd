"""What every config builds on: the strict `Section`, the fields every stage shares, and the metadata a stage config
declares for the platform (how it is launched, its trigger-form fields, what it reads from earlier stages).

Pure Python on purpose: Airflow (operators/, dags/) imports `training.config` to validate and render job configs, so
nothing here may import torch, megatron or mlflow.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, so a typo in `--set` never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else ./mlruns.")
    experiment: str = "seekflow"
    tags: dict[str, str] = Field(default_factory=dict, description="Tags on every run (dag_run_id, pipeline_run).")


@dataclass(frozen=True)
class StageInput:
    """One thing a stage reads. `field` names it in the stage's config (and in its own DAG's trigger form); left
    unset, the stage reads the output of the `upstream` stage kind under the same run_root ({run_root}/{upstream}/).
    `required`: the stage cannot run without it, so a DAG that does not run `upstream` first checks it exists."""

    field: str | None = None
    upstream: str | None = None
    required: bool = True


@dataclass(frozen=True)
class StageSpec:
    """What the platform needs to know about a stage kind, declared once on its config class (`stage_spec`).

    kind: the stage's name: `python -m training <kind>`, the module `training.stages.<kind>`, its key in a pipeline
        document, and its default run directory `{run_root}/<kind>/`.
    launcher: "torchrun" (a GPU job: a JobSet on Kubernetes, torchrun ranks locally) or "python" (one CPU process).
    gpus_per_node: torchrun stages only; 0 takes the cluster's GPUs per node (one process per GPU), 1 runs a single
        process on one GPU (generation and sandboxed code execution need no more).
    shardable: the config has a `shards` field, and a shard phase runs that many processes before the main one.
    form_fields: the knobs worth a trigger-form field, as paths relative to the stage section (`train.steps`); every
        other field stays reachable through the `overrides` Param.
    inputs: what the stage reads (see `StageInput`); an input with a field leads or joins the stage's own DAG form,
        and in the pipeline the upstream stage fills it.
    retries, retry_delay_minutes, timeout_minutes: the Airflow task defaults of the stage's jobs (a DAG author's
        own `retries` / `retry_delay` / `execution_timeout`, or default_args, win). Retrying is safe because stages
        are idempotent: a finished stage skips, a training stage resumes from its last complete checkpoint, and
        promote gates again against whatever champion is current. The timeout turns a hung job (a stuck collective,
        a dead data source) into a failed try whose job is stopped.
    """

    kind: str
    launcher: Literal["torchrun", "python"] = "python"
    gpus_per_node: int = 0
    shardable: bool = False
    form_fields: tuple[str, ...] = ()
    inputs: tuple[StageInput, ...] = ()
    retries: int = 2
    retry_delay_minutes: float = 2.0
    timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_delay_minutes < 0 or not self.timeout_minutes > 0:
            raise ValueError(f"stage {self.kind}: retries and retry_delay_minutes must be >= 0 and timeout_minutes "
                             f"> 0 (got {self.retries}, {self.retry_delay_minutes}, {self.timeout_minutes})")

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stage kinds this one reads from, in declaration order."""
        return tuple(dict.fromkeys(i.upstream for i in self.inputs if i.upstream))

    @property
    def input_fields(self) -> tuple[str, ...]:
        return tuple(i.field for i in self.inputs if i.field)


INSTANCE_NAME = r"^[a-z][a-z0-9_]*$"   # a directory name, an Airflow task id and one segment of a dotted path


class StageConfig(Section):
    """Fields every stage shares. A stage writes under `{run_root}/{stage_name}/` and ends with a manifest.

    Concrete stage configs set `stage_spec`; `training.config.pipeline.STAGES` registers them."""

    stage_spec: ClassVar[StageSpec]

    profile: str = Field("tiny", description="Preset the run came from; names the registered model seekflow-<profile>.")
    run_root: str = Field("runs/default", description="Local path or URI under which every stage writes.")
    seed: int = 1234
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    name: str | None = Field(
        None, pattern=INSTANCE_NAME,
        description="This stage instance's name: its run directory {run_root}/{name}/ and its key in a pipeline "
                    "document. Default: the stage kind. A pipeline may hold a second instance of a kind under "
                    "another name (a section with `stage: <kind>`).")

    reads: dict[str, str] = Field(
        default_factory=dict,
        description="Which stage instance stands in for an upstream kind, e.g. {pretrain: code_cpt}: this instance "
                    "then reads {run_root}/code_cpt/ wherever its kind reads {run_root}/pretrain/ (how a pipeline "
                    "chains a second evaluate → register → promote after code_cpt).")

    @property
    def stage_name(self) -> str:
        """The instance's name, which is also its run directory under run_root (default: the stage kind)."""
        return self.name or self.stage_spec.kind

    def upstream(self, kind: str) -> str:
        """The stage instance whose output this one reads for upstream `kind` (default: that kind's own)."""
        return self.reads.get(kind, kind)

    @model_validator(mode="after")
    def _reads_known_kinds(self) -> "StageConfig":
        unknown = sorted(set(self.reads) - set(self.stage_spec.upstream))
        if unknown:
            raise ValueError(f"reads: {self.stage_spec.kind} reads no {unknown} (its upstream kinds: "
                             f"{list(self.stage_spec.upstream) or 'none'})")
        bad = sorted(v for v in self.reads.values() if not re.match(INSTANCE_NAME, v))
        if bad:
            raise ValueError(f"reads: {bad} are not stage instance names")
        return self


# Copied from a pipeline document into every stage section; `name` is per instance, not shared.
SHARED_KEYS = ("profile", "run_root", "seed", "tracking")


def deep_merge(base: dict, update: dict) -> dict:
    """`update` into `base`, section by section (a nested dict merges, anything else replaces); returns `base`."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base
