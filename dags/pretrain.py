"""seekflow_pretrain: pretrain on a curated corpus — validate_config → pretrain.

Wiring only. Trains the preset's DeepSeek-style MoE with megatron-core under torchrun on the corpus named by
`pretrain.data_manifest` (a finished curate stage: the `manifest` in a `seekflow_curate` run's XCom, or its `curate/`
folder); `validate_config` fails at once when it is missing. `pretrain.init_checkpoint` (optional) starts from a
release or a registered version (`models:/seekflow-tiny@champion`) instead of a random init. Checkpoints, the release
checkpoint and the manifest land under `$SEEKFLOW_HOME/runs/seekflow_pretrain/<run_id>/pretrain/`; a retry resumes
from the last checkpoint. The trigger form is generated from `PretrainConfig`; fields left at the `tiny` preset's
value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("pretrain")

with DAG(
    dag_id="seekflow_pretrain",
    description="Pretrain a DeepSeek-style MoE on a curated corpus",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "pretrain"],
    # The corpus to train on (an input from curate) leads the form's first section: this DAG cannot run without one.
    params=stage_form("pretrain"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("pretrain",))
    stage_jobs("pretrain", config)
