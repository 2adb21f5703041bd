"""seekflow_long_context: Long-context extension — not implemented yet.

Will extend a checkpoint's context window with YaRN (DeepSeek-V3 §4.3: 4K → 32K → 128K) and train briefly on long
sequences. The model side exists (`model.rope_scaling`, see the README's YaRN paragraph); the stage does not.

Until the stage is built, this DAG's only task, `long_context_not_implemented`, fails with "not implemented yet:
long_context" whenever the DAG is triggered: a placeholder never reports a success it did not earn. No issue is
filed for it yet.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.params import not_implemented

with DAG(
    dag_id="seekflow_long_context",
    description="Long-context extension (not implemented yet)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["seekflow", "stage", "long_context", "not-implemented"],
    doc_md=__doc__,
) as dag:
    not_implemented("long_context", issue="the roadmap in README.md; no issue is filed for it yet")
