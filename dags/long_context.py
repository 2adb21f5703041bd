"""seekflow_long_context: extend a model's context with YaRN, phase after phase — validate_config → long_context.

Wiring only. Starts from `long_context.init_checkpoint` (a release directory, s3:// URI or registered version such as
`models:/seekflow-tiny@champion`; empty: the release of the training stage it reads under the run root, code_cpt's
by the pipeline chain's `reads`, which then must exist) and trains each phase of `long_context.phases` in turn on the
corpus named by `long_context.data_manifest` (a finished curate stage), each from the previous phase's release:
DeepSeek-V3 §4.3 goes 4K → 32K → 128K with YaRN s = 40, α = 1, β = 32. Every phase's checkpoints and release land
under `$SEEKFLOW_HOME/runs/seekflow_long_context/<run_id>/long_context/phase_<i>/`; a retry resumes the interrupted
phase. A phase longer than the original context × s, or one whose sequence does not split over the context-parallel
ranks, fails in validate_config, naming the field. The trigger form is generated from `LongContextConfig`; fields
left at the `tiny` preset's value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("long_context")

with DAG(
    dag_id="seekflow_long_context",
    description="Extend a model's context window with YaRN (DeepSeek-V3 §4.3)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "long_context"],
    # The corpus and the model to extend (inputs from curate and pretrain) lead the form's first section.
    params=stage_form("long_context"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("long_context",))
    stage_jobs("long_context", config)
