"""seekflow_pipeline: the whole run, end to end — curate → pretrain → register.

Wiring only. The first task validates the full pipeline config from the trigger form's Params, so a bad value fails
before any compute starts; every stage then runs `python -m training <stage>` through the chosen backend and passes
its result on through XCom. Parsing this file imports no torch, megatron or mlflow.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task

from operators.backends import BACKENDS
from operators.job import TrainingJobOperator, pipeline_overrides
from training.config import list_presets

with DAG(
    dag_id="seekflow_pipeline",
    description="Curate a corpus, pretrain a DeepSeek-style MoE, register the checkpoint in MLflow",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow"],
    params={
        "profile": Param("tiny", enum=list_presets(), description="Preset: model architecture and stage settings."),
        "steps": Param(None, type=["null", "integer"], minimum=1,
                       description="Pretraining steps (empty: the preset's default)."),
        "backend": Param("local", enum=list(BACKENDS), description="Where the jobs run."),
        "overrides": Param({}, type="object",
                           description='Advanced: pipeline config overrides by dotted path, '
                                       'e.g. {"pretrain.optimizer.lr": 0.001}.'),
    },
    doc_md=__doc__,
) as dag:

    @task
    def validate_config(**context) -> dict:
        """Resolve and validate every stage's config; fails naming the field before anything runs."""
        from training.config import resolve_pipeline_config

        params = context["params"]
        overrides = pipeline_overrides(params, context["dag"].dag_id, context["run_id"])
        pipeline = resolve_pipeline_config(params["profile"], overrides)
        print(f"run root: {pipeline.run_root}")
        return {"preset": params["profile"], "overrides": overrides}

    pipeline = validate_config()
    curate = TrainingJobOperator(task_id="curate", stage="curate", pipeline=pipeline,
                                 backend="{{ params.backend }}")
    pretrain = TrainingJobOperator(task_id="pretrain", stage="pretrain", pipeline=pipeline,
                                   backend="{{ params.backend }}")
    register = TrainingJobOperator(task_id="register", stage="register", pipeline=pipeline,
                                   backend="{{ params.backend }}")
    pipeline >> curate >> pretrain >> register
