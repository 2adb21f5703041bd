"""Trigger-form Params generated from the stage config schemas, and the tasks every stage DAG starts with.

The form and the config share one source of truth: each Param's JSON schema (type, enum, bounds, pattern, items,
description) is cut out of `PipelineConfig.model_json_schema()`, and its default is the DAG's preset value. Airflow
validates a trigger against these schemas before a run exists, so a value the pydantic config would reject is rejected
by the form (REST and UI alike), naming the same field. Rules that span fields (warm-up below steps, top-k within the
experts...) cannot be written in JSON schema; `validate_config` catches those before any job starts.

Which fields a form offers is declared by each stage config (`stage_spec.form_fields` and `stage_spec.inputs`): a
stage DAG offers the stage's inputs and knobs, the pipeline DAG every stage's knobs (their inputs come from the stages
before them). Param keys are the pipeline config's dotted paths (`pretrain.train.steps`), the same paths the
`overrides` Param, the `--set` flag and the validation errors use. A field left at the DAG preset's value is not an
override: choosing another `profile` then takes that profile's value, so the form's numbers never silently replace
a preset's.

Pure Airflow-side code: imports pydantic models from `training.config`, never torch, megatron or mlflow.
"""
from __future__ import annotations

import copy
import functools
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from airflow.sdk import Param, task
from airflow.sdk.exceptions import AirflowFailException

from operators.backends import BACKENDS
from operators.job import pipeline_overrides
from training.config import STAGES, ConfigError, PipelineConfig, StageInput, list_presets, resolve_pipeline_config

DEFAULT_PROFILE = "tiny"

SHARED_FIELDS = ("seed",)   # pipeline fields every form offers besides the stages' own
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
    return PipelineConfig.model_json_schema()


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


# -------------------------------------------------------------------------------- fields from the registry --
def stage_fields(kind: str) -> tuple[str, ...]:
    """A stage kind's curated knobs (`stage_spec.form_fields`) as dotted pipeline paths: `pretrain.train.steps`."""
    return tuple(f"{kind}.{field}" for field in STAGES[kind].stage_spec.form_fields)


def input_fields(kind: str, *, leading: bool = False) -> tuple[str, ...]:
    """The fields naming what a stage kind reads (`pretrain.data_manifest`). `leading`: only those an upstream stage
    must provide, which lead its DAG's form (the stage cannot run without them)."""
    inputs = STAGES[kind].stage_spec.inputs
    return tuple(f"{kind}.{i.field}" for i in inputs if i.field and (not leading or (i.required and i.upstream)))


def stage_form_fields(kind: str) -> tuple[str, ...]:
    """A stage DAG's form fields: the shared ones, what the stage reads, then its knobs."""
    return SHARED_FIELDS + input_fields(kind) + stage_fields(kind)


def stage_form(kind: str, profile: str = DEFAULT_PROFILE) -> dict[str, Param]:
    """A stage DAG's trigger form; what an upstream stage would provide leads its first section."""
    leading = {path: config_param(path, profile, section=None) for path in input_fields(kind, leading=True)}
    return form_params(stage_form_fields(kind), profile, extra=leading)


def pipeline_form_fields(kinds: Iterable[str]) -> tuple[str, ...]:
    """The pipeline DAG's form fields: the shared ones, then each stage's knobs (its inputs come from upstream)."""
    return SHARED_FIELDS + tuple(path for kind in kinds for path in stage_fields(kind))


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
    """Each required input whose upstream stage this DAG does not run (neither its kind nor the instance the stage
    reads instead, e.g. evaluate_sft's sft) must exist already (local paths only; object-store and registry
    references are the stage's to check)."""
    kinds = {pipeline.stage(name).stage_spec.kind for name in stages}
    for name in stages:
        cfg = pipeline.stage(name)
        for needed in cfg.stage_spec.inputs:
            runs_here = needed.upstream in kinds or cfg.upstream(needed.upstream or "") in stages
            if needed.required and needed.upstream and not runs_here:
                problem = _missing_input(cfg.run_root, getattr(cfg, needed.field) if needed.field else None, needed,
                                         cfg.upstream(needed.upstream))
                if problem:
                    where = f"{name}.{needed.field}" if needed.field else name
                    raise ConfigError(f"invalid config:\n  {where}: {problem}")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")   # s3://, models:/, file://


def _missing_input(run_root: str, ref: str | None, needed: StageInput, upstream: str) -> str | None:
    """Why the input is missing: unset, the upstream instance's manifest under run_root must exist; set, the path
    must."""
    location = ref or f"{run_root.rstrip('/')}/{upstream}"
    if _SCHEME.match(location) and not location.startswith("file://"):
        return None
    path = Path(location.removeprefix("file://"))
    if ref is None and not (path / "manifest.json").is_file():
        return (f"no {upstream} manifest at {location!r}; run the {upstream} stage under this "
                f"run_root first, or set this field")
    if ref is not None and not path.exists():
        return f"nothing at {ref!r} (the {needed.upstream} stage's output is expected)"
    return None


def validate_config(fields: Sequence[str], stages: Sequence[str] | Mapping[str, Sequence[str]],
                    profile: str = DEFAULT_PROFILE):
    """The first task of every real stage DAG: form -> overrides -> a validated pipeline config, or a clear failure.
    `stages`: the stage instances the DAG runs, or {recipe: instances} for a DAG that runs the recipe its `recipe`
    Param names (`recipe_param`).

    Returns `{"preset", "overrides"}` (and `"recipe"`) through XCom; `TrainingJobOperator(pipeline=...)` rebuilds the
    config from it.
    """
    fields = tuple(fields)
    recipes = {name: tuple(chain) for name, chain in stages.items()} if isinstance(stages, Mapping) else None
    stages = None if recipes else tuple(stages)

    @task(task_id="validate_config")
    def _validate(**context) -> dict:
        params = context["params"]
        overrides = config_overrides(params, fields, context["dag"].dag_id, context["run_id"], profile)
        try:
            pipeline = resolve_pipeline_config(params["profile"], overrides)
            _check_inputs(pipeline, recipes[params["recipe"]] if recipes else stages)
        except ConfigError as err:
            raise AirflowFailException(str(err)) from None   # a bad config does not get better on retry
        print(f"run root: {pipeline.run_root}")
        for path, value in sorted(overrides.items()):
            print(f"  {path} = {value!r}")
        chosen = {"recipe": params["recipe"]} if recipes else {}
        return {"preset": params["profile"], "overrides": overrides, **chosen}

    validated = _validate()
    # Reading upstream manifests (S3) may fail transiently; a bad config fails at once (AirflowFailException).
    # Set after creation so that the DAG's default_args, when they name these, win.
    op, taken = validated.operator, set(getattr(validated.operator.dag, "default_args", None) or {})
    for key, value in VALIDATE_TASK_DEFAULTS.items():
        if key not in taken:
            setattr(op, key, value)
    return validated


def recipe_param(recipes: Mapping[str, Sequence[str]], default: str, description: str) -> Param:
    """The form field choosing which of a DAG's recipes (chains of stage instances) a run takes."""
    return Param(default, type="string", enum=list(recipes), title="recipe", description=description)


def choose_recipe(recipes: Mapping[str, Sequence[str]], validated):
    """A branch after validate_config: the first task of the chosen recipe's chain runs, every other chain is
    skipped."""

    @task.branch(task_id="choose_recipe")
    def _choose(validated: dict) -> str:
        return recipes[validated["recipe"]][0]

    return _choose(validated)


VALIDATE_TASK_DEFAULTS = {"retries": 2, "retry_delay": timedelta(seconds=30), "execution_timeout": timedelta(minutes=10)}


# ------------------------------------------------------------------------------------------- placeholders --
def not_implemented(stage: str, issue: str):
    """The one task of a stage DAG whose stage is not built yet: it fails, loudly, whenever it runs."""

    @task(task_id=f"{stage}_not_implemented", retries=0)
    def _placeholder() -> None:
        raise AirflowFailException(f"not implemented yet: {stage} (see {issue})")

    return _placeholder()
