"""Trigger-form Params generated from the stage config schemas: the form rejects what the config rejects, naming the
same field and bound, and the values it accepts map back to config overrides."""
from __future__ import annotations

import json

import pytest

REAL_DAGS = ("seekflow_pipeline", "seekflow_curate", "seekflow_pretrain")


@pytest.fixture(scope="module")
def dags(dagbag):
    return dagbag


@pytest.fixture(scope="module")
def served(dags):
    """Each DAG as the API server holds it (serialized and back): what validates a trigger from the UI or REST."""
    from airflow.serialization.serialized_objects import DagSerialization

    return {dag_id: DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(dag))))
            for dag_id, dag in dags.items()}


def form_error(served_dag, key, value) -> str | None:
    """What the trigger form answers (the server's Param validation), or None when it accepts the value."""
    from airflow.exceptions import ParamValidationError

    try:
        served_dag.params.deep_merge({key: value}).validate()
    except ParamValidationError as err:
        return str(err)
    return None


def config_error(path: str, value) -> str | None:
    """What the pydantic config answers, through both the pipeline view and the stage's own entry point."""
    from training.config import STAGES, ConfigError, resolve_pipeline_config, resolve_stage_config

    try:
        resolve_pipeline_config("tiny", {path: value})
        pipeline_error = None
    except ConfigError as err:
        pipeline_error = str(err)
    stage, _, stage_path = path.partition(".")
    if stage in STAGES and stage_path:
        try:
            resolve_stage_config(stage, "tiny", overrides={stage_path: value})
            stage_ok = True
        except ConfigError as err:
            stage_ok = False
            assert f"  {stage_path}" in str(err), err   # the field, or a field inside it
        assert stage_ok == (pipeline_error is None), (path, value, pipeline_error)
    return pipeline_error


def test_generated_params_carry_the_schema(dags):
    params = dags["seekflow_pretrain"].params
    steps = params.get_param("pretrain.train.steps")
    assert steps.value == 300 and steps.schema["type"] == "integer" and steps.schema["minimum"] == 1
    assert steps.schema["section"] == "pretrain: train"
    assert "Optimizer steps" in steps.description and "≥ 1" in steps.description
    lr = params.get_param("pretrain.optimizer.lr")
    assert lr.value == 3e-3 and lr.schema["type"] == "number" and lr.schema["exclusiveMinimum"] == 0
    assert params.get_param("pretrain.optimizer.decay_style").schema["enum"] == ["cosine", "constant", "linear",
                                                                             "deepseek-v3", "multi-step"]
    experts = params.get_param("pretrain.model.num_experts")
    assert experts.value == 8 and experts.schema["type"] == ["integer", "null"] and experts.schema["minimum"] == 1
    assert params.get_param("pretrain.data_manifest").value is None
    assert "section" not in params.get_param("pretrain.data_manifest").schema   # leads the first section
    warm_start = params.get_param("pretrain.init_checkpoint")
    assert warm_start.value is None and warm_start.schema["type"] == ["string", "null"]
    assert "models:/name@alias" in warm_start.description
    sources = dags["seekflow_curate"].params.get_param("curate.sources")
    assert sources.schema["items"]["properties"]["kind"]["enum"] == ["package_metadata", "package_code", "jsonl",
                                                                    "parquet", "text", "repos"]
    assert sources.schema["items"]["additionalProperties"] is False
    alias = dags["seekflow_pipeline"].params.get_param("register.alias")
    assert alias.value == "candidate" and alias.schema["pattern"] == "^[a-z][a-z0-9_-]*$"


@pytest.mark.parametrize("dag_id", REAL_DAGS)
def test_every_default_passes_the_form_and_the_config(served, dag_id):
    params = served[dag_id].params
    values = params.validate()   # the server's check of a trigger that changes nothing
    from operators.params import preset_value

    for key, value in values.items():
        if "." in key:
            assert value == preset_value(key, "tiny") or value is None, key


# Out-of-bounds values: (Param key, value, what both messages must name besides the field).
REJECTED = [
    ("pretrain.train.steps", 0, ["1"]),
    ("pretrain.train.seq_length", 4, ["8"]),
    ("pretrain.model.num_layers", -3, ["1"]),
    ("pretrain.optimizer.lr", 0, ["0"]),                      # exclusive bound (gt=0)
    ("pretrain.optimizer.clip_grad", -1.0, ["0"]),
    ("pretrain.optimizer.warmup_steps", -1, ["0"]),
    ("curate.max_reject_ratio", 1.5, ["1"]),                  # upper bound (le=1)
    ("pretrain.model.num_experts", 0, ["1"]),                 # optional field: null passes, 0 does not
    ("pretrain.optimizer.decay_style", "exponential", ["cosine", "constant", "linear"]),
    ("register.alias", "Champion!", ["^[a-z][a-z0-9_-]*$"]),
    ("curate.sources", [{"kind": "web"}], ["package_metadata", "package_code"]),
    ("curate.sources", [{"kind": "package_code", "max_documents": 0}], ["1"]),
    ("curate.sources", [{"kind": "package_code", "colour": "red"}], ["colour"]),
]


@pytest.mark.parametrize("key, value, named", REJECTED, ids=[f"{k}={v}" for k, v, _ in REJECTED])
def test_form_rejects_what_the_config_rejects_naming_the_same_field_and_bound(served, key, value, named):
    dag = served["seekflow_pretrain" if key.startswith("pretrain.") else "seekflow_pipeline"]
    config = config_error(key, value)
    form = form_error(dag, key, value)
    assert config and form, (config, form)
    assert f"Invalid input for param {key}: " in form
    assert f"{key}" in config            # pydantic: `pretrain.train.steps: Input should be ... (got 0)`
    for token in named:
        assert token in form.splitlines()[0], (token, form)   # the headline, above jsonschema's details
        assert token in config, (token, config)


def _bounded_fields(params):
    for key, param in params.items():
        schema = param.schema
        for keyword in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if keyword in schema and "." in key:
                yield key, keyword, schema[keyword], schema["type"]


@pytest.mark.parametrize("dag_id", REAL_DAGS)
def test_every_bound_in_the_form_is_a_bound_of_the_config(dags, served, dag_id):
    """Just past each bound of every generated field: rejected by both; at the bound: the same answer from both."""
    checked = 0
    for key, keyword, bound, types in _bounded_fields(dags[dag_id].params):
        integer = "integer" in (types if isinstance(types, list) else [types])
        step = 1 if integer else max(abs(bound) * 1e-3, 1e-6)
        outside = {"minimum": bound - step, "exclusiveMinimum": bound, "maximum": bound + step,
                   "exclusiveMaximum": bound}[keyword]
        assert form_error(served[dag_id], key, outside), (key, outside)
        assert config_error(key, outside), (key, outside)
        checked += 1
    assert checked >= {"seekflow_curate": 1}.get(dag_id, 10)


def test_null_means_the_profile_value_only_where_the_config_allows_it(served):
    assert form_error(served["seekflow_pipeline"], "steps", None) is None
    assert form_error(served["seekflow_pretrain"], "pretrain.model.num_experts", None) is None
    assert "None is not of type 'integer'" in form_error(served["seekflow_pretrain"], "pretrain.train.steps", None)
    assert config_error("pretrain.train.steps", None)


def test_form_values_map_back_to_overrides():
    from operators.params import config_overrides, field_overrides, preset_value, stage_fields

    PRETRAIN_FIELDS = stage_fields("pretrain")
    defaults = {key: preset_value(key) for key in PRETRAIN_FIELDS}
    assert field_overrides(defaults, PRETRAIN_FIELDS) == {}          # an untouched form overrides nothing
    changed = {**defaults, "pretrain.train.steps": 12, "pretrain.optimizer.warmup_steps": 3}
    assert field_overrides(changed, PRETRAIN_FIELDS) == {"pretrain.train.steps": 12,
                                                         "pretrain.optimizer.warmup_steps": 3}
    params = {**changed, "profile": "tiny", "steps": None, "run_root": "/tmp/r",
              "overrides": {"pretrain.train.steps": 14, "pretrain.model.hidden_size": 32}}
    overrides = config_overrides(params, PRETRAIN_FIELDS, "seekflow_pretrain", "manual__1")
    assert overrides["pretrain.train.steps"] == 14                  # the raw overrides win over form fields
    assert overrides["pretrain.optimizer.warmup_steps"] == 3 and overrides["pretrain.model.hidden_size"] == 32
    assert overrides["run_root"] == "/tmp/r" and overrides["tracking.tags.dag_run_id"] == "manual__1"


def test_untouched_fields_follow_the_chosen_profile():
    """The form shows tiny's values; choosing deepseek-v3 without touching them must not train a 3-layer V3."""
    from operators.params import config_overrides, preset_value, stage_fields
    from training.config import resolve_pipeline_config

    PRETRAIN_FIELDS = stage_fields("pretrain")
    params = {key: preset_value(key) for key in PRETRAIN_FIELDS}
    params.update({"profile": "deepseek-v3", "overrides": {}, "pretrain.optimizer.lr": 1e-4})
    overrides = config_overrides(params, PRETRAIN_FIELDS, "seekflow_pretrain", "manual__2")
    pipeline = resolve_pipeline_config("deepseek-v3", overrides)
    assert pipeline.pretrain.model.num_layers == 61 and pipeline.pretrain.model.hidden_size == 7168
    assert pipeline.pretrain.optimizer.lr == 1e-4


def test_field_schema_resolves_refs_and_optionals():
    from operators.params import field_schema

    assert field_schema("pretrain.model.q_lora_rank") == {
        "type": ["integer", "null"], "minimum": 1, "default": 32,
        "description": "d'_c, the query compression dimension (None: no q LoRA)."}
    assert field_schema("register.alias")["pattern"] == "^[a-z][a-z0-9_-]*$"
    assert "$ref" not in json.dumps(field_schema("curate.sources"))
    with pytest.raises(KeyError, match="no field 'stepz'"):
        field_schema("pretrain.train.stepz")


def test_form_fields_come_from_the_stage_specs():
    from operators.params import input_fields, pipeline_form_fields, stage_fields, stage_form_fields
    from training.config import STAGES

    assert stage_fields("pretrain")[:2] == ("pretrain.train.steps", "pretrain.train.seq_length")
    assert stage_form_fields("pretrain")[:3] == ("seed", "pretrain.data_manifest", "pretrain.init_checkpoint")
    assert input_fields("evaluate", leading=True) == ("evaluate.checkpoint",)
    assert input_fields("promote", leading=True) == ()   # optional inputs stay in the stage's section
    pipeline = pipeline_form_fields(STAGES)
    assert "register.alias" in pipeline and "evaluate.humaneval.enabled" in pipeline
    assert not {"pretrain.data_manifest", "evaluate.checkpoint", "promote.version"} & set(pipeline)   # from upstream


def test_inputs_an_upstream_stage_would_provide_are_checked_before_any_job(tmp_path):
    from operators.params import _check_inputs
    from training.config import ConfigError, resolve_pipeline_config

    def check(stages, **overrides):
        _check_inputs(resolve_pipeline_config("tiny", {"run_root": str(tmp_path), **overrides}), stages)

    with pytest.raises(ConfigError, match=r"  pretrain\.data_manifest: no curate manifest at '.*/curate'"):
        check(("pretrain",))
    with pytest.raises(ConfigError, match=r"  evaluate\.checkpoint: no pretrain manifest at"):
        check(("evaluate",))
    with pytest.raises(ConfigError, match=r"  evaluate\.checkpoint: nothing at '/no/such/release'"):
        check(("evaluate",), **{"evaluate.checkpoint": "/no/such/release"})
    check(("evaluate",), **{"evaluate.checkpoint": "models:/seekflow-tiny@champion"})   # the stage resolves it
    check(("curate", "pretrain", "evaluate", "register", "promote"))   # upstream stages run first in this DAG
    check(("promote",))   # its inputs are optional
    (tmp_path / "curate").mkdir()
    (tmp_path / "curate" / "manifest.json").write_text("{}")
    check(("pretrain",))
    with pytest.raises(ConfigError, match=r"  pretrain_more\.data_manifest: nothing at"):   # a further instance
        check(("pretrain_more",), **{"pretrain_more.stage": "pretrain", "pretrain_more.data_manifest": "/nope"})
