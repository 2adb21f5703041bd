"""Resolve a stage config from a preset, a YAML file and `--set a.b=c` overrides, and explain validation errors.

Order (later wins): the preset's pipeline document (viewed for one stage) → the `--config` YAML (stage-shaped)
→ `--set` overrides. Validation happens once, at the end, so an invalid value fails before anything runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import BaseModel, ValidationError

from training.config.base import SHARED_KEYS, StageConfig, deep_merge
from training.config.pipeline import STAGES, PipelineConfig, instance_section


class ConfigError(ValueError):
    """A config that does not validate. The message lists every bad field by its dotted path."""

    permanent = True   # bad input: the job says so and the task is not retried (training/__main__.py)


# Extra preset folders (os.pathsep-separated), searched after the packaged ones: the test suite's `micro` preset
# lives in tests/support/presets, so it never shows up in a user's trigger form.
EXTRA_PRESETS_ENV = "SEEKFLOW_EXTRA_PRESETS"


def _preset_files() -> dict:
    files = {p.name[: -len(".yaml")]: p for p in resources.files("training.config.presets").iterdir()
             if p.name.endswith(".yaml")}
    for folder in filter(None, os.environ.get(EXTRA_PRESETS_ENV, "").split(os.pathsep)):
        for path in sorted(Path(folder).glob("*.yaml")):
            files.setdefault(path.stem, path)
    return files


def list_presets() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str) -> dict:
    files = _preset_files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(files))}")
    return yaml.safe_load(files[name].read_text()) or {}


def stage_kind(pipeline_doc: dict, name: str) -> str:
    """The kind of the stage instance `name`: a registered kind itself, or a section of the pipeline document with
    `stage: <kind>` (a further instance)."""
    if name in STAGES:
        return name
    section = pipeline_doc.get(name)
    if isinstance(section, dict) and section.get("stage") in STAGES:
        return section["stage"]
    raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}, or a section of the pipeline "
                      "with `stage: <kind>`")


def stage_view(pipeline_doc: dict, name: str) -> dict:
    """The stage-shaped document inside a pipeline document: shared keys plus the section of the stage instance
    `name` (a kind, or a further instance: see `instance_section`)."""
    stage_kind(pipeline_doc, name)   # an unknown name is an error, not an empty stage
    doc = {k: copy.deepcopy(pipeline_doc[k]) for k in SHARED_KEYS if k in pipeline_doc}
    section = instance_section(pipeline_doc, name)
    section.pop("stage", None)
    return deep_merge(doc, section)


def apply_overrides(doc: dict, overrides: Iterable[str] | dict) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML, so `3`, `true`, `null`, `[1,2]` work) or a dict."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for path, value in items:
        node = doc
        *parents, leaf = path.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{path}: cannot set a sub-key, {key!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return doc


def _split_override(text: str) -> tuple[str, str]:
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"override {text!r} is not of the form a.b.c=value")
    return path.strip(), value


def validate(model: type[BaseModel], doc: dict) -> BaseModel:
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(explain(err)) from None


def explain(err: ValidationError) -> str:
    """One line per error: `dotted.path: reason (got value)`."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(config)"
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}{got}")
    return "invalid config:\n" + "\n".join(lines)


def resolve_stage_config(stage: str, preset: str | None = None, config_path: str | Path | None = None,
                         overrides: Iterable[str] | dict = ()) -> StageConfig:
    """One stage instance's config: a stage kind, or a further instance the preset declares (`stage: <kind>`)."""
    pipeline_doc = load_preset(preset) if preset else {}
    kind = stage_kind(pipeline_doc, stage)
    doc = stage_view(pipeline_doc, stage) if preset else {}
    if config_path:
        deep_merge(doc, _read_config(str(config_path)))
    apply_overrides(doc, overrides)
    return validate(STAGES[kind], doc)


def _read_config(source: str) -> dict:
    """A stage config from a YAML file, or from an environment variable with `env:NAME` (how Kubernetes jobs get it)."""
    if source.startswith("env:"):
        name = source[len("env:"):]
        if name not in os.environ:
            raise ConfigError(f"--config {source}: environment variable {name} is not set")
        text = os.environ[name]
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        text = path.read_text()
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {source}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {source}: expected a mapping at the top level")
    return loaded


def resolve_pipeline_config(preset: str, overrides: dict | Iterable[str] = ()) -> PipelineConfig:
    """The pipeline view used by the DAGs: overrides use pipeline paths such as `pretrain.train.steps`."""
    doc = apply_overrides(load_preset(preset), overrides)
    return validate(PipelineConfig, doc)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(cfg: BaseModel, exclude: set[str] = frozenset({"tracking", "name"})) -> str:
    """Hash of what determines a stage's outputs. Tracking tags name the run, not the result; the instance name is
    its directory, where the manifest carrying the hash lives."""
    payload = json.dumps(cfg.model_dump(mode="json", exclude=set(exclude)), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
