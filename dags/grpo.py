"""seekflow_grpo: reinforcement learning with GRPO and rule-based rewards, DeepSeek-R1-Zero's recipe —
validate_config → grpo.

Wiring only. The policy starts from `grpo.init_checkpoint` (a release directory, an s3:// URI or any registered
version such as `models:/seekflow-tiny@champion`; empty: the pretrain release under the run root, which then must
exist: R1-Zero applies RL straight to the base model, DeepSeek-R1 §2.2). Each rollout samples `grpo.group_size`
completions for each of `grpo.prompts_per_step` prompts of the task suite's train split (`grpo.tasks`) at
`grpo.temperature`, after R1 Table 1's instruction (`grpo.system_prompt`); the format and accuracy rewards score them
(the task checkers; code in the sandbox), advantages are relative to each prompt's group (DeepSeekMath §4.1.2), and
the policy is updated `grpo.updates_per_rollout` times on the rollout with the clipped objective (`grpo.epsilon`) and
a KL penalty (`grpo.beta`) to the frozen initial model (replaced by the policy every `grpo.reference_reset_steps`
steps when set). One torchrun process per GPU: rollouts and updates run under data, pipeline and expert
parallelism (tensor and context parallelism fail validation, naming the field). Checkpoints, the release, sample
tables and the manifest (the parent release as lineage) land under
`$SEEKFLOW_HOME/runs/seekflow_grpo/<run_id>/grpo/`; a retry resumes from the last checkpoint and redraws that
rollout. Rewards, accuracy, format rate, KL, clip fraction, response length and throughput go to the stage's MLflow
run. The trigger form is generated from `GrpoConfig`; fields left at the `tiny` preset's value take the chosen
profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import stage_jobs
from operators.params import stage_form, stage_form_fields, validate_config

FIELDS = stage_form_fields("grpo")

with DAG(
    dag_id="seekflow_grpo",
    description="GRPO with rule-based rewards on the task suite (DeepSeek-R1-Zero)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "grpo"],
    # The model to train (an input from pretrain) leads the form's first section.
    params=stage_form("grpo"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=("grpo",))
    stage_jobs("grpo", config)
