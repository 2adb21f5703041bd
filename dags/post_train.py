"""seekflow_post_train: Post-training — not implemented yet.

Will post-train a checkpoint: supervised fine-tuning on chat data with the DeepSeek chat template, then GRPO and
distillation.

Until the stage is built, this DAG's only task, `post_train_not_implemented`, fails with "not implemented yet:
post_train" whenever the DAG is triggered: a placeholder never reports a success it did not earn. No issue is filed for it yet.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.params import not_implemented

with DAG(
    dag_id="seekflow_post_train",
    description="Post-training (not implemented yet)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["seekflow", "stage", "post_train", "not-implemented"],
    doc_md=__doc__,
) as dag:
    not_implemented("post_train", issue="the roadmap in README.md; no issue is filed for it yet")
