"""Trigger-form Params generated from the stage config schemas, and the tasks every stage DAG starts with.

The form and the config share one source of truth: each Param's JSON schema (type, enum, bounds, pattern, items,
description) is cut out of `PipelineConfig.model_json_schema()`, and its default is the DAG's preset value. Airflow
validates a trigger against these schemas before a run exists, so a value the pydantic config would reject is rejected
by the form (REST and UI alike), naming the same field. Rules that span fields (warm-up below steps, top-k within the
experts...) cannot be written in JSON schema; `validate_config` catches those before any job starts.

Param keys are the pipeline config's dotted paths (`pretrain.train.steps`), the same paths the `overrides` Param, the
`--set` flag and the validation errors use. A field left at the DAG preset's value is not an override: choosing
another `profile` then takes that profile's value, so the form's numbers never silently replace a preset's.

Pure Airflow-side code: imports pydantic models from `training.config`, never torch, megatron or mlflow.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from airflow.sdk import Param, task
from airflow.sdk.exceptions import AirflowFailException

from operators.backends import BACKENDS
from operators.job import pipeline_overrides
from training.config import ConfigError, PipelineConfig, list_presets, resolve_pipeline_config

DEFAULT_PROFILE = "tiny"

# Curated form fields per stage: the knobs worth a form field. Everything else stays reachable through `overrides`.
CURATE_FIELDS = (
    "curate.sources",
    "curate.max_reject_ratio",
    "curate.shards",
    "curate.near_dedup",
)
PRETRAIN_FIELDS = (
    "pretrain.train.steps",
    "pretrain.train.seq_length",
    "pretrain.train.micro_batch_size",
    "pretrain.train.global_batch_size",
    "pretrain.train.log_interval",
    "pretrain.train.save_interval",
    "pretrain.optimizer.lr",
    "pretrain.optimizer.min_lr",
    "pretrain.optimizer.warmup_steps",
    "pretrain.optimizer.decay_style",
    "pretrain.optimizer.weight_decay",
    "pretrain.optimizer.clip_grad",
    "pretrain.model.num_layers",
    "pretrain.model.hidden_size",
    "pretrain.model.num_attention_heads",
    "pretrain.model.num_experts",
    "pretrain.model.moe_router_topk",
    "pretrain.model.moe_router_score_function",
    "pretrain.model.mtp_num_layers",
    "pretrain.model.mtp_loss_scaling_factor",
)
REGISTER_FIELDS = (
    "register.model_name",
    "register.alias",
)
EVALUATE_FIELDS = (
    "evaluate.checkpoint",
    "evaluate.humaneval.enabled",
    "evaluate.humaneval.max_problems",
    "evaluate.fim.enabled",
    "evaluate.fim.num_spans",
    "evaluate.passkey.enabled",
    "evaluate.passkey.context_lengths",
    "evaluate.arith.enabled",
    "evaluate.arith.num_problems",
    "evaluate.perplexity.enabled",
)
PROMOTE_FIELDS = (
    "promote.gates",
    "promote.allow_first_champion",
    "promote.fail_on_refusal",
)
SHARED_FIELDS = ("seed",)
# Descriptions for fields whose config model has none.
_NOTES = {
    "curate.sources": "Corpus sources, each {kind: package_metadata | package_code | jsonl | parquet | text | repos, "
                      "name, uri (local or s3://), weight, max_documents, languages, quality, pii, decontaminate, "
                      "near_dedup, ...}; names must be unique",
    "seed": "Random seed shared by every stage",
    "promote.gates": "Gated metrics, each {metric (a seekflow.eval.<metric> version tag), higher_is_better, "
                     "max_regression (absolute), min, max}",
}

# JSON-schema keywords that carry over to a Param (pydantic's `title` is dropped: the form labels fields by key).
_KEEP = ("type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
         "minLength", "maxLength", "pattern", "items", "minItems", "maxItems", "properties", "required",
         "additionalProperties", "anyOf", "format")
_BOUNDS = {"minimum": "≥ {}", "exclusiveMinimum": "> {}", "maximum": "≤ {}", "exclusiveMaximum": "< {}"}


# ------------------------------------------------------------------------------------------ schema -> Param --
@functools.cache
def _pipeline_schema() -> dict:
    return PipelineConfig.model_json_schema()   # by alias: the register section is `register`


def _inline(node: Any, defs: dict) -> Any:
    """Replace every `$ref` with the definition it points at, so a Param's schema stands on its own."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            return _inline({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def field_schema(path: str) -> dict:
    """The JSON schema of one config field, by its dotted pipeline path (`pretrain.optimizer.lr`)."""
    root = _pipeline_schema()
    defs = root.get("$defs", {})
    node: dict = root
    for part in path.split("."):
        node = _inline(node, defs)
        props = node.get("properties") or {}
        if part not in props:
            raise KeyError(f"{path}: no field {part!r} in the pipeline config schema")
        node = props[part]
    return _flatten_optional(_inline(node, defs))


def _flatten_optional(schema: dict) -> dict:
    """`anyOf: [{type: integer, minimum: 1}, {type: null}]` -> `type: [integer, null], minimum: 1`.

    Bounds apply to numbers only, so null still validates; the form's widget follows the non-null type."""
    options = schema.get("anyOf")
    if not options:
        return schema
    nulls = [o for o in options if o.get("type") == "null"]
    others = [o for o in options if o.get("type") != "null"]
    if len(others) != 1 or not nulls or "type" not in others[0]:
        return schema
    flat = {k: v for k, v in schema.items() if k != "anyOf"}
    flat.update(others[0])
    flat["type"] = [others[0]["type"], "null"]
    return flat


def _describe(schema: dict, profile: str, default: Any) -> str:
    """The schema's description, its bounds in words (the form shows no bounds otherwise), the preset's value."""
    parts = [schema["description"].rstrip(".")] if schema.get("description") else []
    bounds = [fmt.format(schema[k]) for k, fmt in _BOUNDS.items() if k in schema]
    if "pattern" in schema:
        bounds.append(f"matching {schema['pattern']}")
    if bounds:
        parts.append(f"Allowed: {', '.join(bounds)}")
    if not isinstance(default, (dict, list)):
        parts.append(f"Preset {profile}: {'empty' if default is None else default}")
    return ". ".join(parts) + "." if parts else ""


@functools.cache
def preset_values(profile: str) -> dict:
    """The preset's fully resolved pipeline config (defaults filled in), as JSON-compatible data."""
    return resolve_pipeline_config(profile).model_dump(mode="json", by_alias=True)


def preset_value(path: str, profile: str = DEFAULT_PROFILE) -> Any:
    """One field of the preset by its dotted pipeline path (`register.alias` -> "candidate")."""
    node: Any = preset_values(profile)
    for part in path.split("."):
        node = node[part]
    return copy.deepcopy(node)


def section_of(path: str) -> str | None:
    """Form section by the stage and sub-section: `pretrain.train.steps` -> `pretrain: train`."""
    parts = path.split(".")[:-1]
    return ": ".join(parts) if parts else None


_SECTION = object()


def config_param(path: str, profile: str = DEFAULT_PROFILE, *, optional: bool = False,
                 section: str | None = _SECTION) -> Param:
    """One trigger-form Param for a config field: its schema, description and bounds, the preset's default.

    `optional`: the Param also takes null, its default, meaning "the chosen profile's value"."""
    schema = field_schema(path)
    schema.setdefault("description", _NOTES.get(path, ""))
    default = preset_value(path, profile)
    kwargs = {k: v for k, v in schema.items() if k in _KEEP}
    description = _describe(schema, profile, default)
    if optional:
        types = kwargs.get("type", [])
        kwargs["type"] = list(dict.fromkeys([*(types if isinstance(types, list) else [types]), "null"]))
        description = f"Empty: the profile's value. {description}"
        default = None
    section = section_of(path) if section is _SECTION else section
    if section:
        kwargs["section"] = section
    return Param(default, description=description, **kwargs)


def run_params(profile: str = DEFAULT_PROFILE) -> dict[str, Param]:
    """The Params every seekflow DAG shares: preset, backend and advanced overrides."""
    return {
        "profile": Param(profile, enum=list_presets(),
                         description="Preset: model architecture and stage settings. Form fields left at the "
                                     f"{profile} preset's value take the chosen profile's value."),
        "backend": Param("local", enum=list(BACKENDS), description="Where the jobs run."),
        "overrides": Param({}, type="object",
                           description='Advanced: pipeline config overrides by dotted path, e.g. '
                                       '{"pretrain.optimizer.lr": 0.001}. They win over the form fields.'),
    }


def form_params(fields: Iterable[str], profile: str = DEFAULT_PROFILE, *, extra: Mapping[str, Param] = ()
                ) -> dict[str, Param]:
    """The whole trigger form: shared run Params, `extra` DAG-specific ones, then one Param per config field."""
    params = run_params(profile)
    params.update(dict(extra))
    for path in fields:
        params.setdefault(path, config_param(path, profile))
    return params


# ----------------------------------------------------------------------------------------- Param -> config --
def field_overrides(params: Mapping[str, Any], fields: Iterable[str], profile: str = DEFAULT_PROFILE) -> dict:
    """Config overrides from the form: every field whose value differs from the DAG preset's value."""
    overrides = {}
    for path in fields:
        if path in params and params[path] != preset_value(path, profile):
            overrides[path] = params[path]
    return overrides


def config_overrides(params: Mapping[str, Any], fields: Iterable[str], dag_id: str, run_id: str,
                     profile: str = DEFAULT_PROFILE) -> dict:
    """Form fields first, then what `pipeline_overrides` derives (run root, tags, `steps`) and the raw `overrides`."""
    overrides = field_overrides(params, fields, profile)
    overrides.update(pipeline_overrides(dict(params), dag_id, run_id))
    return overrides


def _check_inputs(pipeline: PipelineConfig, stages: Sequence[str]) -> None:
    """A stage run without its upstream stage in the same DAG needs that input to exist (local paths only)."""
    if "pretrain" in stages and "curate" not in stages:
        manifest = pipeline.pretrain.data_manifest or f"{pipeline.run_root}/curate"
        if "://" not in manifest or manifest.startswith("file://"):
            path = Path(manifest.removeprefix("file://"))
            if not (path / "manifest.json" if path.is_dir() else path).is_file():
                raise ConfigError(
                    f"invalid config:\n  pretrain.data_manifest: no curate manifest at {manifest!r}; set it to a "
                    "finished curate stage (the `manifest` in a seekflow_curate run's XCom, or its curate/ folder)")


def validate_config(fields: Sequence[str], stages: Sequence[str], profile: str = DEFAULT_PROFILE):
    """The first task of every real stage DAG: form -> overrides -> a validated pipeline config, or a clear failure.

    Returns `{"preset", "overrides"}` through XCom; `TrainingJobOperator(pipeline=...)` rebuilds the config from it.
    """
    fields, stages = tuple(fields), tuple(stages)

    @task(task_id="validate_config")
    def _validate(**context) -> dict:
        params = context["params"]
        overrides = config_overrides(params, fields, context["dag"].dag_id, context["run_id"], profile)
        try:
            pipeline = resolve_pipeline_config(params["profile"], overrides)
            _check_inputs(pipeline, stages)
        except ConfigError as err:
            raise AirflowFailException(str(err)) from None   # a bad config does not get better on retry
        print(f"run root: {pipeline.run_root}")
        for path, value in sorted(overrides.items()):
            print(f"  {path} = {value!r}")
        return {"preset": params["profile"], "overrides": overrides}

    return _validate()


# ------------------------------------------------------------------------------------------- placeholders --
def not_implemented(stage: str, issue: str):
    """The one task of a stage DAG whose stage is not built yet: it fails, loudly, whenever it runs."""

    @task(task_id=f"{stage}_not_implemented", retries=0)
    def _placeholder() -> None:
        raise AirflowFailException(f"not implemented yet: {stage} (see {issue})")

    return _placeholder()
