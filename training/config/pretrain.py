"""The pretrain stage's config: a model, its parallel layout, an optimizer and a training loop, on a curated corpus."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from training.config.base import StageConfig, StageInput, StageSpec
from training.config.model import ModelConfig
from training.config.parallel import ParallelConfig, stage_layers, stage_sizes
from training.config.train import OptimizerConfig, TrainLoopConfig


class TrainingConfig(StageConfig):
    """What every stage that trains the model shares: the model, its parallel layout, the optimizer and the loop,
    checked together (the layout must split the model; the schedule must fit the steps). Concrete stages (pretrain,
    code_cpt, sft, ...) add their inputs and a `stage_spec`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if self.optimizer.warmup_steps >= self.train.steps:
            raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be below train.steps "
                             f"({self.train.steps})")
        if self.train.seq_length > self.model.max_position_embeddings:
            raise ValueError("train.seq_length exceeds model.max_position_embeddings")
        par = self.parallel
        if stage_sizes(self.model.num_layers, par) is None:
            raise ValueError(f"model.num_layers ({self.model.num_layers}) cannot be split evenly over "
                             f"{par.pipeline_model_parallel_size} pipeline stages (see parallel.decoder_*_num_layers)")
        vpp, stages = par.virtual_pipeline_model_parallel_size, par.pipeline_model_parallel_size
        if vpp is not None and self.model.num_layers % (stages * vpp):   # (VPP leaves first/last unset)
            raise ValueError(f"model.num_layers ({self.model.num_layers}) must be divisible by "
                             f"parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size "
                             f"({stages} x {vpp}): every model chunk holds the same number of layers")
        cp, tp = par.context_parallel_size, par.tensor_model_parallel_size
        if self.train.seq_length % (2 * cp):
            raise ValueError(f"train.seq_length ({self.train.seq_length}) must be divisible by 2 x "
                             f"parallel.context_parallel_size ({2 * cp}): each context-parallel rank holds two of the "
                             f"sequence's 2 x CP equal chunks")
        if par.sequence_parallel and (self.train.seq_length // cp) % tp:
            raise ValueError(f"train.seq_length / parallel.context_parallel_size ({self.train.seq_length // cp}) "
                             f"must be divisible by parallel.tensor_model_parallel_size ({tp}): sequence "
                             f"parallelism splits each rank's tokens over the tensor-parallel ranks")
        needs = {"mla_up_proj": ("model.multi_latent_attention", self.model.multi_latent_attention),
                 "moe": ("model.num_experts", self.model.num_experts is not None),
                 "shared_experts": ("model.moe_shared_experts", bool(self.model.moe_shared_experts))}
        for module in par.recompute:
            field, present = needs.get(module, (None, True))
            if not present:
                raise ValueError(f"parallel.recompute lists {module!r}, but this model has none ({field})")
        ep = self.parallel.expert_model_parallel_size
        if self.model.num_experts is not None and self.model.num_experts % ep:
            raise ValueError(f"model.num_experts ({self.model.num_experts}) not divisible by expert parallel size {ep}")
        if par.moe_grouped_gemm and self.train.precision == "fp8":
            raise ValueError("parallel.moe_grouped_gemm: grouped expert GEMMs in FP8 are not built; with "
                             "train.precision fp8 the experts run sequentially (moe_grouped_gemm: false)")
        return self

    def check_checkpointable_without_fused_adam(self) -> None:
        """Refuse a layout megatron-core 0.16 cannot checkpoint when neither Transformer Engine nor Apex is installed
        (CPU runs): its distributed optimizer then asserts on saving a rank whose expert optimizer holds no parameter,
        which is any pipeline stage made only of dense layers under expert parallelism
        (DistributedOptimizer.state_dict: `assert len(steps) == 1`). With TE or Apex (GPU clusters) it works, so the
        pretrain stage calls this only when neither is installed: the DeepSeek-V3 preset's first stage (its 3 dense
        layers) is such a stage and is fine on a cluster."""
        par, model = self.parallel, self.model
        ep = par.expert_model_parallel_size
        if model.num_experts is None or ep == 1 or not par.use_distributed_optimizer:
            return
        for stage, held in enumerate(stage_layers(model.num_layers, par)):
            has_mtp = stage == par.pipeline_model_parallel_size - 1 and model.mtp_num_layers
            if not has_mtp and all(i < model.first_k_dense_layers for i in held):
                raise ValueError(
                    f"pipeline stage {stage} holds only dense layers ({', '.join(str(i + 1) for i in held)}; "
                    f"model.first_k_dense_layers is {model.first_k_dense_layers}): with "
                    f"parallel.expert_model_parallel_size {ep} and parallel.use_distributed_optimizer, megatron-core "
                    f"cannot checkpoint its empty expert optimizer without Transformer Engine or Apex. Give the stage "
                    f"an MoE layer (parallel.decoder_first_pipeline_num_layers) or set "
                    f"parallel.use_distributed_optimizer: false")


class PretrainConfig(TrainingConfig):
    """Pretraining under torchrun, one process per GPU; the data comes from the curate stage."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # Long (a real run sets its own): a retry resumes from the last complete checkpoint, so a try lost to a
        # node failure or a hung collective costs at most one save interval.
        kind="pretrain", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=3 * 24 * 60,
        inputs=(StageInput("data_manifest", upstream="curate"), StageInput("init_checkpoint", required=False)),
        form_fields=(
            "train.steps", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "train.log_interval", "train.save_interval",
            "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.decay_style",
            "optimizer.weight_decay", "optimizer.clip_grad",
            "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.num_experts",
            "model.moe_router_topk", "model.moe_router_score_function", "model.mtp_num_layers",
            "model.mtp_loss_scaling_factor",
        ))

    data_manifest: str | None = Field(None, description="Curate manifest to train on; default {run_root}/curate.")
    init_checkpoint: str | None = Field(
        None, min_length=1, description="Start from these weights instead of a random init: a release directory, an "
        "s3:// URI or a registered version (models:/name/version, models:/name@alias). The optimizer, schedules and "
        "data start fresh; the architecture must match, except the context fields (model.rope_scaling, "
        "model.max_position_embeddings), so that a context extension can start from a 4K model. A rerun that "
        "resumes this stage's own checkpoint ignores it.")
