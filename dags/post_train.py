"""seekflow_post_train: supervised fine-tuning on DeepSeek-V3's chat template, gated on the task suite —
validate_config → sft → evaluate_sft → register_sft → promote_sft.

Wiring only. Fine-tunes `sft.init_checkpoint` (a release directory, s3:// URI or registered version such as
`models:/seekflow-tiny@champion`; empty: the release of the stage it reads under the run root, long_context's by the
pipeline chain's `reads` (DeepSeek-V3 fine-tunes the context-extended model), which then must exist) on
`sft.data` (JSONL/Parquet conversation records, local or s3://; empty: the generated task suite's train split,
`sft.tasks`), packed with sample masking, loss on assistant tokens only, for `sft.epochs` passes (DeepSeek-V3 §5.1:
two). Bad records are set aside with their reason (`rejects.jsonl`); a file with more than `sft.max_reject_ratio` bad
records fails the job, naming the file, and is not retried. Checkpoints, the release and the manifest (parent and
data lineage) land under `$SEEKFLOW_HOME/runs/seekflow_post_train/<run_id>/sft/`; a retry resumes from the last
checkpoint. Then the release is scored on the task suite's held-out split (`evaluate_sft`: exact match, nothing
else), registered as a version of `seekflow-<profile>` whose parent is the model it fine-tuned, and promoted when
`tasks.accuracy` is not worse than the champion's (`promote_sft.gates`). The GRPO recipes (R1-Zero, R1) will follow
sft here. The trigger form is generated from `SftConfig`.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import chain_jobs
from operators.params import stage_form, stage_form_fields, validate_config
from training.config import POST_TRAIN_CHAIN

FIELDS = stage_form_fields("sft")

with DAG(
    dag_id="seekflow_post_train",
    description="Supervised fine-tuning on DeepSeek-V3's chat template (V3 §5.1)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "post_train", "sft"],
    # The model to fine-tune (the input from pretrain) leads the form's first section.
    params=stage_form("sft"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=POST_TRAIN_CHAIN)
    chain_jobs(POST_TRAIN_CHAIN, config)
