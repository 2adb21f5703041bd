"""The sft stage's config: supervised fine-tuning of a released model on conversations in DeepSeek-V3's chat template,
packed with sample masking (DeepSeek-V3 §5.1; DeepSeek-R1 §2.3)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from training.config.base import StageInput, StageSpec
from training.config.child_tuning import ChildTuningConfig
from training.config.pretrain import TrainingConfig
from training.config.tasks import TaskSuiteConfig
from training.config.train import OptimizerConfig


class SftConfig(TrainingConfig):
    """Fine-tuning under torchrun from a model release, on conversation records or the generated task suite."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # As pretrain: a retry resumes from the last complete checkpoint.
        kind="sft", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=24 * 60,
        inputs=(StageInput("init_checkpoint", upstream="pretrain"),),
        form_fields=(
            "data", "epochs", "tasks.tasks", "tasks.train_items", "child_tuning.mode", "child_tuning.p_f",
            "child_tuning.p_d",
            "train.steps", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
        ))

    init_checkpoint: str | None = Field(
        None, min_length=1, description="The model to fine-tune: a release directory, an s3:// URI or a registered "
        "version (models:/seekflow-<profile>@champion, models:/name/version). Default: the pretrain stage's release "
        "under run_root (or the instance `reads.pretrain` names). `model` must be its architecture.")
    data: str | None = Field(
        None, description="Conversations to fine-tune on: a JSONL/Parquet file, folder or s3:// prefix of records "
        "with `messages` (training/data/chat.py). None: the task suite's train split (`tasks`), generated.")
    tasks: TaskSuiteConfig = Field(default_factory=TaskSuiteConfig,
                                   description="The generated task suite, used when `data` is None.")
    reasoning: bool = Field(False, description="Write the generated task records as reasoning turns: a worked "
                                               "solution in <think> before the answer (DeepSeek-R1 §2.3.1's "
                                               "cold-start format; training/verify/tasks.py worked_reasoning).")
    epochs: float | None = Field(
        2.0, gt=0, description="Passes over the packed data; sets train.steps to ceil(epochs x sequences / "
                               "global_batch_size) once the data is packed (DeepSeek-V3 §5.1: two epochs). None: "
                               "train.steps as given.")
    child_tuning: ChildTuningConfig = Field(
        default_factory=ChildTuningConfig, description="Child-Tuning (Xu et al. 2021): update only a child network "
        "of the parameters (task_free: a fresh Bernoulli(p_f) draw each step; task_driven: the top p_d by Fisher "
        "information). Off by default.")
    # DeepSeek-V3 §5.1: "a cosine decay learning rate scheduling that starts at 5 × 10^-6 and gradually decreases to
    # 1 × 10^-6" (DeepSeek-V2 §4.1: 5e-6 too). What a preset without its own sft optimizer gets.
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(decay_style="cosine", lr=5e-6, min_lr=1e-6))
    max_reject_ratio: float = Field(0.1, ge=0, le=1, description="Fail when more than this share of a file's "
                                                                "records is bad (each bad record is set aside).")
