"""seekflow_evaluate: Evaluation — not implemented yet.

Will evaluate a checkpoint or a registered version (`models:/name@alias`): held-out perplexity, HumanEval pass@k, FIM
exact match, passkey retrieval at several context lengths; metrics go to MLflow.

Until the stage is built, this DAG's only task, `evaluate_not_implemented`, fails with "not implemented yet: evaluate"
whenever the DAG is triggered: a placeholder never reports a success it did not earn. Tracked in issue 5.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.params import not_implemented

with DAG(
    dag_id="seekflow_evaluate",
    description="Evaluation (not implemented yet)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["seekflow", "stage", "evaluate", "not-implemented"],
    doc_md=__doc__,
) as dag:
    not_implemented("evaluate", issue="issue 5")
