"""seekflow_code_cpt: Continued pretraining on code — not implemented yet.

Will continue pretraining a checkpoint on repository-level code with fill-in-the-middle (PSM) samples using the
DeepSeek tokenizer's FIM tokens, as DeepSeek-Coder does.

Until the stage is built, this DAG's only task, `code_cpt_not_implemented`, fails with "not implemented yet: code_cpt"
whenever the DAG is triggered: a placeholder never reports a success it did not earn. No issue is filed for it yet.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.params import not_implemented

with DAG(
    dag_id="seekflow_code_cpt",
    description="Continued pretraining on code (not implemented yet)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["seekflow", "stage", "code_cpt", "not-implemented"],
    doc_md=__doc__,
) as dag:
    not_implemented("code_cpt", issue="the roadmap in README.md; no issue is filed for it yet")
