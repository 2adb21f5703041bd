"""seekflow_code_cpt: continued pretraining on code with fill-in-the-middle — validate_config → code_cpt.

Wiring only. Continues a released model (`code_cpt.init_checkpoint`: a release directory, an s3:// URI or a
registered version such as `models:/seekflow-tiny@champion`) on a curated mixture (`code_cpt.data_manifest`: a
finished curate stage whose code source was curated with fim.rate 0.5, e.g. a `seekflow_curate` run with
`curate.sources[].fim`), weighted by `code_cpt.mixture`, as DeepSeek-Coder-V2 continues DeepSeek-V2 (§2-3).
`validate_config` fails at once when either input is missing; a reference that does not resolve, a parent whose
architecture differs from the profile's model, or a corpus curated with another FIM rate fail the job before the
first step, naming the field, and are not retried. Checkpoints, the release checkpoint and the manifest (with the
parent it continued, for register's lineage) land under `$SEEKFLOW_HOME/runs/seekflow_code_cpt/<run_id>/code_cpt/`;
a retry resumes from the last checkpoint. The trigger form is generated from `CodeCptConfig`; fields left at the
`tiny` preset's value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("code_cpt")

with DAG(
    dag_id="seekflow_code_cpt",
    description="Continue a released model on code with fill-in-the-middle (DeepSeek-Coder-V2)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "code_cpt"],
    # The corpus and the model to continue (inputs from curate and pretrain) lead the form's first section.
    params=stage_form("code_cpt"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("code_cpt",))
    stage_jobs("code_cpt", config)
