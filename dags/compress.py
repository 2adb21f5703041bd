"""seekflow_compress: contrastive pruning (CAP; Xu et al., AAAI 2022) of a fine-tuned model, gated on the task suite —
validate_config → compress → evaluate_compress → register_compress → promote_compress.

Wiring only. The model to compress (`compress.fine_tuned`: a release directory, an s3:// URI or any registered
version such as `models:/seekflow-tiny@champion`; empty: the sft release under the run root) and its pre-trained
parent (`compress.pretrained`; empty: the pretrain release) are pinned and verified before anything runs, and must both
be the architecture `compress.model`. The fine-tuned model is pruned to `compress.pruning.sparsity` (unstructured:
weight magnitude per matrix; structured: FFN neurons of the dense FFNs and of every expert, and MLA attention heads)
on `compress.pruning.schedule` while it trains on the task suite's train split (`compress.tasks`) with CAP's
contrastive terms against the pre-trained model (PrC), the fine-tuned model (FiC) and its own pruning snapshots (SnC),
each weighted in `compress.contrastive` (0 turns one off). Checkpoints, SnC's snapshots, the release (pruned weights
stored as zeros) and the manifest (both parents, the reached sparsity and the non-zero parameters) land under
`$SEEKFLOW_HOME/runs/seekflow_compress/<run_id>/compress/`; a retry resumes from the last checkpoint. Then the pruned
model is scored on the task suite's held-out split (`evaluate_compress`), registered as a version of its own model,
`seekflow-<profile>-sparse`, tagged with its sparsity, non-zero parameters and both parents, and promoted when
`tasks.accuracy` is not worse than that model's champion's (`promote_compress.gates`). The trigger form is generated
from `CompressConfig`; fields left at the `tiny` preset's value take the chosen profile's value.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from operators.job import chain_jobs
from operators.params import stage_form, stage_form_fields, validate_config
from training.config import COMPRESS_CHAIN

FIELDS = stage_form_fields("compress")

with DAG(
    dag_id="seekflow_compress",
    description="Prune a fine-tuned model with contrastive pruning (CAP), gated on the task suite",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["seekflow", "stage", "compress"],
    # The two models (the inputs from sft and pretrain) lead the form's first section.
    params=stage_form("compress"),
    doc_md=__doc__,
) as dag:
    config = validate_config(FIELDS, stages=COMPRESS_CHAIN)
    chain_jobs(COMPRESS_CHAIN, config)
