"""The distill stage's config: a teacher's rejection-sampled traces on the task suite, then supervised fine-tuning
of a dense student on them (DeepSeek-R1 §2.3.3 for the sampling, §2.4 for the distillation)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import StageInput, StageSpec
from training.config.model import ModelConfig
from training.config.pretrain import TrainingConfig
from training.config.tasks import TaskSuiteConfig


class DistillConfig(TrainingConfig):
    """Under torchrun: every rank samples its share of the prompts from a whole copy of the teacher, then the ranks
    train the student (`model`, `parallel`) on the kept traces as the sft stage trains on conversations."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # As sft: a retry reuses the traces already sampled and resumes the student from its last checkpoint.
        kind="distill", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=24 * 60,
        inputs=(StageInput("teacher", upstream="sft"), StageInput("init_checkpoint", required=False)),
        form_fields=(
            "tasks.tasks", "tasks.train_items", "samples_per_prompt", "temperature", "top_p", "max_new_tokens",
            "epochs", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
        ))

    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(num_experts=None, mtp_num_layers=0),
        description="The student's architecture: dense by default (no MoE, no MTP), as R1 §2.4's students are.")
    teacher: str | None = Field(
        None, min_length=1, description="The model whose traces are distilled: a release directory, an s3:// URI or "
        "any registered version (models:/seekflow-<profile>@champion, models:/name/version). Default: the sft "
        "stage's release under run_root (or the instance `reads.sft` names).")
    init_checkpoint: str | None = Field(
        None, min_length=1, description="The student's starting weights (a release of the student architecture "
        "`model`: path, s3:// or models:/). None: a random init. DeepSeek-R1 §2.4 starts from pretrained dense "
        "bases (Qwen2.5, Llama-3).")
    tasks: TaskSuiteConfig = Field(default_factory=TaskSuiteConfig,
                                   description="The prompts: the task suite's train split, generated.")
    samples_per_prompt: int = Field(
        4, ge=1, le=64, description="Completions sampled per prompt; the correct ones are kept (R1 §2.3.3 samples "
                                    "several per prompt without saying how many; R1 §3 samples 4 to 64 to score).")
    temperature: float = Field(0.6, gt=0, le=2, description="Sampling temperature (R1 §3's 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling's p (R1 §3's 0.95).")
    max_new_tokens: int = Field(
        48, ge=1, description="Longest completion; one that has not ended by then is rejected as unfinished. Sized "
        "for the task suite's short answers: a reasoning teacher needs thousands (R1 §3 allows 32,768) and a "
        "train.seq_length above them.")
    generation_batch_size: int = Field(64, ge=1, le=4096, description="Prompts decoded together.")
    epochs: float | None = Field(
        2.0, gt=0, description="Passes over the packed traces; sets train.steps as sft's `epochs` does (DeepSeek-V3 "
                               "§5.1: two). None: train.steps as given.")
    student: Literal["model", "teacher"] = Field(
        "model", description="model: a student of the architecture `model`, from `init_checkpoint` (R1 §2.4). "
        "teacher: the teacher itself fine-tunes on its own kept samples (its architecture and weights; `model` and "
        "`init_checkpoint` are not used): DeepSeek-R1 §2.3.3's rejection sampling and SFT, as the r1 recipe runs it.")
    reasoning: bool = Field(False, description="The teacher reasons: its reply opens inside <think> (the prompt ends "
                                               "with it, as grpo's r1 format samples) and a kept trace keeps its "
                                               "reasoning.")
    non_reasoning_share: float = Field(
        0.0, ge=0, le=10, description="Direct-answer conversations of the task suite (no reasoning) added, as a "
        "share of the kept traces (DeepSeek-R1 §2.3.3: ~200k non-reasoning beside ~600k reasoning samples: 1/3).")
    max_reject_ratio: float = Field(0.1, ge=0, le=1, description="Fail when more than this share of the kept traces "
                                                                "cannot be trained on (longer than a sequence).")

    @model_validator(mode="after")
    def _check_trace_length(self) -> "DistillConfig":
        if self.max_new_tokens >= self.train.seq_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below train.seq_length "
                             f"({self.train.seq_length}): a trace, its prompt included, must fit one sequence")
        return self
