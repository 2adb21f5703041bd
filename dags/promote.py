"""seekflow_promote: Promotion — not implemented yet.

Will move a registered version's aliases (candidate → staging → champion) only when the configured evaluation
thresholds hold.

Until the stage is built, this DAG's only task, `promote_not_implemented`, fails with "not implemented yet: promote"
whenever the DAG is triggered: a placeholder never reports a success it did not earn. Tracked in issue 5.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.params import not_implemented

with DAG(
    dag_id="seekflow_promote",
    description="Promotion (not implemented yet)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["seekflow", "stage", "promote", "not-implemented"],
    doc_md=__doc__,
) as dag:
    not_implemented("promote", issue="issue 5")
