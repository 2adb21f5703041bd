"""Trigger-form checks shared by the stage DAG tests: the DAG as the API server holds it, and a value the form and
the config must both refuse."""
from __future__ import annotations

import json

import pytest


def served_params(dag):
    """The DAG's Params as the API server holds them (serialized and back): what validates a trigger from the UI or
    REST."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(dag)))).params


def assert_form_and_config_refuse(params, key: str, value, bound: str) -> None:
    """The form refuses `key: value` on its first line naming `bound`, and the tiny pipeline config refuses it too,
    naming the key and the bound."""
    from airflow.exceptions import ParamValidationError

    from training.config import ConfigError, resolve_pipeline_config

    with pytest.raises(ParamValidationError) as form:
        params.deep_merge({key: value}).validate()
    with pytest.raises(ConfigError) as config:
        resolve_pipeline_config("tiny", {key: value})
    assert f"Invalid input for param {key}: " in str(form.value) and bound in str(form.value).splitlines()[0]
    assert key in str(config.value) and bound in str(config.value)
