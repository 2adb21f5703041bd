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

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("curate")

with DAG(
    dag_id="seekflow_curate",
    description="Curate, tokenize and index a pretraining corpus",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "curate"],
    params=stage_form("curate"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("curate",))
    stage_jobs("curate", config)   # curate_shards >> curate; both wait for the config (their XCom input)
