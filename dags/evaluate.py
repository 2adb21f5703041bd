"""seekflow_evaluate: score a checkpoint or a registered version — validate_config → evaluate.

Wiring only. `evaluate.checkpoint` names what to score: a release directory or URI, or a registered version
(`models:/seekflow-tiny@champion`, `models:/seekflow-tiny/3`). The stage runs HumanEval (completions executed in a
sandboxed subprocess, pass@k), FIM exact match with DeepSeek's FIM tokens, passkey retrieval at the configured context
lengths, generated arithmetic and held-out perplexity; it logs `eval/<suite>/<metric>` to MLflow with a per-item
table, and a registered version gets `seekflow.eval.<suite>.<metric>` tags (what `seekflow_promote` gates on). The
trigger form is generated from `EvaluateConfig`.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("evaluate")

with DAG(
    dag_id="seekflow_evaluate",
    description="Evaluate a checkpoint or registered version: HumanEval, FIM, passkey, arithmetic, perplexity",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "evaluate"],
    # What to evaluate (an input from pretrain) leads the form's first section.
    params=stage_form("evaluate"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("evaluate",))
    stage_jobs("evaluate", config)
