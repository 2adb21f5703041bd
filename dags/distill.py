"""seekflow_distill: a teacher's rejection-sampled traces fine-tune a dense student (DeepSeek-R1 §2.4), gated on the
task suite — validate_config → distill → evaluate_distill → register_distill → promote_distill.

Wiring only. The teacher (`distill.teacher`: a release directory, an s3:// URI or any registered version such as
`models:/seekflow-tiny@champion`; empty: the sft release under the run root, which then must exist) samples
`distill.samples_per_prompt` completions for each prompt of the task suite's train split (`distill.tasks`), at
`distill.temperature` and `distill.top_p` (R1's 0.6 and 0.95); the task checkers keep the correct ones (R1 §2.3.3),
and the rejection rate is recorded. The student (`distill.model`, dense in every preset; from `distill.init_checkpoint`
or a random init) is then fine-tuned on the kept traces as sft fine-tunes, for `distill.epochs` passes. A teacher
reference that does not resolve fails the job before anything is written, naming the field, and is not retried; so
does a teacher none of whose completions checks as correct. The traces (`traces/traces.jsonl`, their summary and
samples of the rejected completions), checkpoints, the release and the manifest (the teacher as parent, the trace
dataset as data) land under `$SEEKFLOW_HOME/runs/seekflow_distill/<run_id>/distill/`; a retry reuses the traces and
resumes the student from its last checkpoint. Then the student is scored on the task suite's held-out split
(`evaluate_distill`: exact match, nothing else), registered as a version of its own model, `seekflow-<profile>-student`
(R1's students are models of their own), with the teacher's model and version as its parent and the trace dataset's
URI and sha256 as its data, and promoted when `tasks.accuracy` is not worse than that model's champion's
(`promote_distill.gates`). The trigger form is generated from `DistillConfig`; fields left at the `tiny` preset's
value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import chain_jobs
from operators.params import stage_form, stage_form_fields, validate_config
from training.config import DISTILL_CHAIN

FIELDS = stage_form_fields("distill")

with DAG(
    dag_id="seekflow_distill",
    description="Distil a teacher's rejection-sampled traces into a dense student, gated (DeepSeek-R1 §2.4)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "distill"],
    # The teacher (the input from sft) leads the form's first section.
    params=stage_form("distill"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=DISTILL_CHAIN)
    chain_jobs(DISTILL_CHAIN, config)
