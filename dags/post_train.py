"""seekflow_post_train: post-training recipes, each gated on the task suite — validate_config → choose_recipe → the
chosen recipe's chain (`recipe`; the other chains are skipped).

Wiring only. Both recipes start from the model sft would fine-tune: `sft.init_checkpoint` (a release directory,
s3:// URI or registered version such as `models:/seekflow-tiny@champion`; empty: the release of the stage it reads
under the run root, long_context's by the pipeline chain's `reads` (DeepSeek-V3 fine-tunes the context-extended
model), which then must exist).

`sft` (the default; DeepSeek-V3 §5.1) — sft → evaluate_sft → register_sft → promote_sft: fine-tunes on `sft.data`
(JSONL/Parquet conversation records, local or s3://; empty: the generated task suite's train split, `sft.tasks`),
packed with sample masking, loss on assistant tokens only, for `sft.epochs` passes. Bad records are set aside with
their reason (`rejects.jsonl`); a file with more than `sft.max_reject_ratio` bad records fails the job, naming the
file, and is not retried. A retry resumes from the last checkpoint.

`r1` (DeepSeek-R1 §2.3) — four training steps, each a stage instance scored on the held-out tasks (evaluate_<step>)
and registered as a version of `seekflow-<profile>` whose parent is the step before it (register_<step>), so the
registry shows the recipe's chain: sft_cold_start (the task suite written as reasoning turns, §2.3.1) →
grpo_reasoning (GRPO in R1's <think> format, accuracy + format + language-consistency rewards, §2.3.2) →
sft_rejection (the policy samples the train prompts, the correct replies plus a third as many direct answers
fine-tune it, §2.3.3) → grpo_all (GRPO again, §2.3.4) → promote_grpo_all. Each step's fields are set through
`overrides` (`grpo_reasoning.train.steps`, ...); each inherits its kind's section (`sft`, `grpo`, `distill`).

Every step writes under `$SEEKFLOW_HOME/runs/seekflow_post_train/<run_id>/<step>/`. The last release is promoted
when `tasks.accuracy` is not worse than the champion's. R1-Zero (GRPO straight from the base) is `seekflow_grpo`.
The trigger form is generated from `SftConfig`, plus `recipe`.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import chain_jobs
from operators.params import choose_recipe, recipe_param, stage_form, stage_form_fields, validate_config
from training.config import RECIPES

FIELDS = stage_form_fields("sft")

with DAG(
    dag_id="seekflow_post_train",
    description="Post-training recipes gated on the task suite: sft (V3 §5.1) or r1 (R1 §2.3)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "post_train", "sft", "grpo"],
    # The model to post-train (the input from pretrain) leads the form's first section.
    params={**stage_form("sft"), "recipe": recipe_param(
        RECIPES, "sft", "sft: supervised fine-tuning (DeepSeek-V3 §5.1). r1: cold-start sft -> reasoning GRPO -> "
                        "rejection sampling + sft -> GRPO (DeepSeek-R1 §2.3), one registered version per step.")},
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=RECIPES)
    chosen = choose_recipe(RECIPES, config)
    for chain in RECIPES.values():
        chain_jobs(chain, config, after=chosen)
