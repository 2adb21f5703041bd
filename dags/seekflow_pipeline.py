"""seekflow_pipeline: the whole run, end to end — curate (shards, then merge) → pretrain → evaluate → register →
promote → curate_code → code_cpt → evaluate → register → promote → long_context → evaluate → register → promote.

Wiring only. The stages, their order and their form fields come from the stage registry and its pipeline chain
(`training/config/pipeline.py` PIPELINE_CHAIN); the trigger form is generated from the stage config schemas
(`operators/params.py`): a value the config would reject is rejected by the form before a run exists. The first task
resolves the preset plus the form into the full pipeline config and validates every stage, so cross-field mistakes
(warm-up ≥ steps...) fail before any compute starts; every stage then runs `python -m training <stage>` through the
chosen backend and passes its result on through XCom. Each training stage's release is scored by an evaluate
instance, becomes a version of seekflow-<profile> that names its parent version (register), and moves the
`staging`/`champion` aliases only when its scores pass the gates against the champion (promote). code_cpt continues
the pretrained release on a FIM code corpus (curate_code); long_context extends code_cpt's release with YaRN. Form
fields left at the `tiny` preset's value take the chosen profile's value. Parsing this file imports no torch,
megatron or mlflow.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import chain_jobs
from operators.params import config_param, form_params, pipeline_form_fields, validate_config
from training.config import PIPELINE_CHAIN, chain_kind

STAGES = PIPELINE_CHAIN   # the stage instances of the end-to-end run, in order (training/config/pipeline.py)
KINDS = tuple(dict.fromkeys(chain_kind(name) for name in STAGES))
# Each kind's knobs once (the further instances of a kind start from its section). Pretraining steps keep their short
# key `steps` here (README, `make run STEPS=N`, REST {"steps": N}); empty means the profile's value, so
# pretrain.train.steps is not a second field.
FIELDS = tuple(f for f in pipeline_form_fields(KINDS) if f != "pretrain.train.steps")

with DAG(
    dag_id="seekflow_pipeline",
    description="Curate, pretrain a DeepSeek-style MoE, evaluate, register in MLflow, promote when the scores allow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "pipeline"],
    params=form_params(FIELDS, extra={"steps": config_param("pretrain.train.steps", optional=True, section=None)}),
    doc_md=__doc__,
) as dag:
    pipeline = validate_config(FIELDS, STAGES)
    chain_jobs(STAGES, pipeline)   # one stage after the other; curate's shard phase is a task of its own
