"""seekflow_curate: build the training corpus on its own — validate_config → curate_shards → curate.

Wiring only. Curates the sample corpus (installed packages' METADATA and source trees; rejects counted and sampled,
exact duplicates removed), tokenizes it with DeepSeek's tokenizer and writes megatron indexed datasets under
`$SEEKFLOW_HOME/runs/seekflow_curate/<run_id>/curate/`. The `curate` task's XCom `manifest` is what
`seekflow_pretrain` takes as `pretrain.data_manifest`. `curate_shards` runs `curate.shards` shard processes (an
Indexed Job on Kubernetes); `curate` merges them and writes the manifest. The trigger form is generated from
`CurateConfig`.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import TrainingJobOperator
from operators.params import CURATE_FIELDS, SHARED_FIELDS, form_params, validate_config

FIELDS = SHARED_FIELDS + CURATE_FIELDS

with DAG(
    dag_id="seekflow_curate",
    description="Curate, tokenize and index a pretraining corpus",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "curate"],
    params=form_params(FIELDS),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("curate",))
    shards = TrainingJobOperator(task_id="curate_shards", stage="curate", sharded=True, pipeline=config,
                                 backend="{{ params.backend }}")
    merge = TrainingJobOperator(task_id="curate", stage="curate", pipeline=config, backend="{{ params.backend }}")
    config >> shards >> merge
