"""seekflow_pipeline: the whole run, end to end — curate → pretrain → register.

Wiring only. The trigger form is generated from the stage config schemas (`operators/params.py`): a value the config
would reject is rejected by the form before a run exists. The first task resolves the preset plus the form into the
full pipeline config and validates every stage, so cross-field mistakes (warm-up ≥ steps...) fail before any compute
starts; every stage then runs `python -m training <stage>` through the chosen backend and passes its result on through
XCom. Form fields left at the `tiny` preset's value take the chosen profile's value. Parsing this file imports no
torch, megatron or mlflow.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import TrainingJobOperator
from operators.params import (CURATE_FIELDS, PRETRAIN_FIELDS, REGISTER_FIELDS, SHARED_FIELDS, config_param,
                              form_params, validate_config)

STAGES = ("curate", "pretrain", "register")
# Pretraining steps keep their short key `steps` here (README, `make run STEPS=N`, REST {"steps": N}); empty means
# the profile's value, so pretrain.train.steps is not a second field.
FIELDS = SHARED_FIELDS + CURATE_FIELDS + tuple(f for f in PRETRAIN_FIELDS if f != "pretrain.train.steps") + \
    REGISTER_FIELDS

with DAG(
    dag_id="seekflow_pipeline",
    description="Curate a corpus, pretrain a DeepSeek-style MoE, register the checkpoint in MLflow",
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
    curate = TrainingJobOperator(task_id="curate", stage="curate", pipeline=pipeline,
                                 backend="{{ params.backend }}")
    pretrain = TrainingJobOperator(task_id="pretrain", stage="pretrain", pipeline=pipeline,
                                   backend="{{ params.backend }}")
    register = TrainingJobOperator(task_id="register", stage="register", pipeline=pipeline,
                                   backend="{{ params.backend }}")
    pipeline >> curate >> pretrain >> register
