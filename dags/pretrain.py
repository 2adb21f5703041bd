"""seekflow_pretrain: pretrain on a curated corpus — validate_config → pretrain.

Wiring only. Trains the preset's DeepSeek-style MoE with megatron-core under torchrun on the corpus named by
`pretrain.data_manifest` (a finished curate stage: the `manifest` in a `seekflow_curate` run's XCom, or its `curate/`
folder); `validate_config` fails at once when it is missing. `pretrain.init_checkpoint` (optional) starts from a release
or a registered version (`models:/seekflow-tiny@champion`) instead of a random init. Checkpoints, the release checkpoint and the manifest land
under `$SEEKFLOW_HOME/runs/seekflow_pretrain/<run_id>/pretrain/`; a retry resumes from the last checkpoint. The trigger
form is generated from `PretrainConfig`; fields left at the `tiny` preset's value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import TrainingJobOperator
from operators.params import PRETRAIN_FIELDS, SHARED_FIELDS, config_param, form_params, validate_config

FIELDS = SHARED_FIELDS + ("pretrain.data_manifest", "pretrain.init_checkpoint") + PRETRAIN_FIELDS

with DAG(
    dag_id="seekflow_pretrain",
    description="Pretrain a DeepSeek-style MoE on a curated corpus",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "pretrain"],
    # The corpus to train on leads the form's first section: this DAG cannot run without one.
    params=form_params(FIELDS, extra={"pretrain.data_manifest": config_param("pretrain.data_manifest",
                                                                             section=None)}),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("pretrain",))
    TrainingJobOperator(task_id="pretrain", stage="pretrain", pipeline=config, backend="{{ params.backend }}")
