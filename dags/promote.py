"""seekflow_promote: eval-gated promotion in the MLflow registry — validate_config → promote.

Wiring only. Promotes `promote.version` (a version number or an alias; default `candidate`) of `promote.model_name`
(default `seekflow-<profile>`): the version gets `staging` when every gated metric (`seekflow.eval.<metric>` tags,
set by the evaluate stage) is within its bounds, and `champion` when none is worse than the current champion's by
more than its `max_regression`. Otherwise it is refused with the reason. The decision and the compared numbers are
recorded on the version (`seekflow.promotion.*` tags) and in the task's XCom. Aliases only: registry stages are
deprecated in MLflow. The trigger form is generated from `PromoteConfig`.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("promote")

with DAG(
    dag_id="seekflow_promote",
    description="Move registry aliases candidate → staging → champion when the evaluation allows",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "promote"],
    params=stage_form("promote"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("promote",))
    stage_jobs("promote", config)
