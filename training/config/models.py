"""Stage configs: one pydantic model per stage, plus the pipeline that composes them.

Pure Python on purpose: Airflow (operators/, dags/) imports this module to validate and render job configs, so it
must never import torch, megatron or mlflow.
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, so a typo in `--set` never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# ----------------------------------------------------------------------------------------------------------- model --
class YarnConfig(Section):
    """YaRN RoPE scaling of MLA's decoupled query/key rotary part (DeepSeek-V3 §4.3, DeepSeek-V2 §3.1.4). The
    defaults are the papers': s = 40, α = 1, β = 32, √t = 0.1 ln s + 1, from a 4K pretraining context."""

    factor: float = Field(40.0, gt=1, description="s, the context scaling factor (DeepSeek-V3 §4.3: 40).")
    original_max_position_embeddings: int = Field(
        4096, ge=1, description="The context the model was pretrained with (DeepSeek-V3 §4.3: 4K).")
    beta_fast: float = Field(32.0, gt=0, description="β: rotary dims turning more than β times over the original "
                             "context keep their frequency (DeepSeek-V3 §4.3: 32).")
    beta_slow: float = Field(1.0, gt=0, description="α: dims turning fewer than α times are interpolated by s "
                             "(DeepSeek-V3 §4.3: 1).")
    mscale_all_dim: float = Field(1.0, ge=0, description="Attention temperature: softmax scale multiplied by "
                                  "(0.1 · mscale_all_dim · ln s + 1)², i.e. √t = 0.1 ln s + 1 (DeepSeek-V3 §4.3: 1).")
    mscale: float = Field(1.0, ge=0, description="With mscale_all_dim, scales cos/sin by the ratio of their "
                          "(0.1 · m · ln s + 1) terms; equal values (DeepSeek's released configs) leave them at 1.")

    @model_validator(mode="after")
    def _check_betas(self) -> "YarnConfig":
        if self.beta_slow >= self.beta_fast:
            raise ValueError(f"beta_slow ({self.beta_slow}) must be below beta_fast ({self.beta_fast})")
        return self


class ModelConfig(Section):
    """A DeepSeek-V3-shaped decoder. Defaults are the `tiny` CPU model; presets carry the papers' architectures."""

    name: str = Field("tiny", description="Architecture name, recorded in MLflow and used for the registered model.")
    num_layers: int = Field(3, ge=1, description="Transformer layers (excluding MTP modules).")
    hidden_size: int = Field(64, ge=8)
    num_attention_heads: int = Field(4, ge=1)
    ffn_hidden_size: int = Field(192, ge=1, description="Intermediate size of the dense (non-MoE) FFN layers.")
    vocab_size: int = Field(129280, ge=1, description="Embedding rows; DeepSeek-V3's 128K tokenizer padded to 129280.")
    max_position_embeddings: int = Field(4096, ge=1)
    rotary_base: float = Field(10000.0, gt=0)
    rope_scaling: YarnConfig | None = Field(
        None, description="YaRN context extension of MLA's rotary part (None: plain RoPE, as in pretraining).")
    norm_epsilon: float = Field(1e-6, gt=0)
    init_method_std: float = Field(0.006, gt=0, description="DeepSeek-V3 §4.2: weights initialised with std 0.006.")
    # Multi-head latent attention (DeepSeek-V2 §2.1): d_c, d'_c, d_h and d_h^R.
    multi_latent_attention: bool = True
    q_lora_rank: int | None = Field(32, ge=1, description="d'_c, the query compression dimension (None: no q LoRA).")
    kv_lora_rank: int = Field(32, ge=1, description="d_c, the KV compression dimension.")
    qk_head_dim: int = Field(16, ge=1, description="d_h, per-head non-rotary query/key dimension.")
    qk_pos_emb_head_dim: int = Field(8, ge=1, description="d_h^R, per-head decoupled RoPE dimension.")
    v_head_dim: int = Field(16, ge=1)
    # Mixture of experts (DeepSeekMoE; DeepSeek-V3 §2.1.2).
    num_experts: int | None = Field(8, ge=1, description="Routed experts per MoE layer (None: dense model).")
    moe_router_topk: int = Field(2, ge=1, description="K_r, routed experts activated per token.")
    moe_ffn_hidden_size: int = Field(64, ge=1, description="Intermediate size of one fine-grained expert.")
    moe_shared_experts: int = Field(1, ge=0, description="N_s, shared experts (their sizes add up).")
    first_k_dense_layers: int = Field(1, ge=0, description="Leading layers with a dense FFN instead of MoE.")
    moe_router_score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    moe_router_enable_expert_bias: bool = Field(True, description="Aux-loss-free balancing (DeepSeek-V3 §2.1.2).")
    moe_router_bias_update_rate: float = Field(1e-3, ge=0, description="γ, bias update speed (DeepSeek-V3 §4.2).")
    moe_router_bias_update_until_tokens: float | None = Field(
        None, ge=0, description="γ becomes 0 once this many tokens are consumed (DeepSeek-V3 §4.2: 14.3e12).")
    moe_router_num_groups: int | None = Field(4, ge=1, description="Expert groups for node-limited routing.")
    moe_router_group_topk: int | None = Field(2, ge=1, description="M, groups (nodes) each token may reach.")
    moe_router_topk_scaling_factor: float | None = Field(None, gt=0, description="Routed scaling factor.")
    moe_aux_loss_coeff: float = Field(1e-4, ge=0, description="α, sequence-wise balance loss (DeepSeek-V3 §4.2).")
    # DeepSeek-V2 routing (arXiv:2405.04434 §2.2), our router in megatron-core's MoE layer (training/model/routers.py).
    moe_router_type: Literal["megatron", "deepseek_v2"] = Field(
        "megatron", description="megatron: megatron-core's TopKRouter, configured by the fields above (the DeepSeek-V3 "
        "path). deepseek_v2: softmax gating, device-limited routing, expert/device/communication balance losses "
        "(V2 eq. 12-20) and device-level token dropping; it implies softmax scores without expert bias and ignores "
        "moe_router_num_groups/group_topk and moe_aux_loss_coeff.")
    moe_device_limit: int | None = Field(None, ge=1, description="deepseek_v2: M, devices each token's experts may "
                                         "lie on (V2 §2.2.2; V2 uses M = 3). None: no limit.")
    moe_num_devices: int | None = Field(None, ge=1, description="deepseek_v2: D, contiguous expert groups treated as "
                                        "devices (emulated when experts are not split over processes). None: the "
                                        "expert-parallel size.")
    moe_aux_loss_coeffs: list[float] = Field(
        default_factory=lambda: [0.003, 0.05, 0.02], min_length=3, max_length=3,
        description="deepseek_v2: α1, α2, α3 of the expert-, device- and communication-level balance losses "
                    "(V2 eq. 12, 15, 18; §3.1.2 values).")
    moe_token_drop_capacity_factor: float | None = Field(
        None, gt=0, description="deepseek_v2: per-device capacity factor of token dropping, training only (V2 "
        "§2.2.4 uses 1.0). None: no dropping.")
    # Multi-token prediction (DeepSeek-V3 §2.2).
    mtp_num_layers: int = Field(1, ge=0, description="D, MTP depth.")
    mtp_loss_scaling_factor: float = Field(0.3, ge=0, description="λ, MTP loss weight (DeepSeek-V3 §4.2: 0.3).")
    mtp_loss_scaling_factor_after: float | None = Field(
        None, ge=0, description="λ once mtp_loss_scaling_switch_tokens are consumed (DeepSeek-V3 §4.2: 0.1).")
    mtp_loss_scaling_switch_tokens: float | None = Field(
        None, ge=0, description="Tokens after which λ becomes mtp_loss_scaling_factor_after (DeepSeek-V3: 10e12).")

    # Training knobs rather than architecture: a run resumed from a checkpoint may change them. Every other field
    # shapes the weights or the function they compute, and must match the checkpoint's.
    RESUMABLE_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "name", "init_method_std", "moe_router_bias_update_rate", "moe_router_bias_update_until_tokens",
        "moe_aux_loss_coeff", "moe_aux_loss_coeffs", "moe_token_drop_capacity_factor", "mtp_loss_scaling_factor",
        "mtp_loss_scaling_factor_after", "mtp_loss_scaling_switch_tokens"})

    # What a context extension changes (DeepSeek-V3 §4.3 starts YaRN from the 4K model): same weights, new positions.
    CONTEXT_FIELDS: ClassVar[frozenset[str]] = frozenset({"rope_scaling", "max_position_embeddings"})

    def architecture_differences(self, recorded: dict, allowed: frozenset[str] = frozenset()) -> list[str]:
        """'field: recorded → this' for each architecture field (less `allowed`) where `recorded` (a checkpoint's
        model_dump) differs from this config; fields the recording lacks (saved by an older version) are not
        compared."""
        mine, free = self.model_dump(mode="json"), self.RESUMABLE_FIELDS | allowed
        return [f"model.{key}: {recorded[key]!r} in the checkpoint, {mine[key]!r} now"
                for key in mine if key in recorded and key not in free and recorded[key] != mine[key]]

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if not self.multi_latent_attention and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.rope_scaling is not None and not self.multi_latent_attention:
            raise ValueError("rope_scaling (YaRN) applies to multi-latent attention's rotary part: it needs "
                             "multi_latent_attention true")
        if self.num_experts is not None:
            if self.moe_router_topk > self.num_experts:
                raise ValueError(f"moe_router_topk ({self.moe_router_topk}) exceeds num_experts ({self.num_experts})")
            if self.first_k_dense_layers >= self.num_layers:
                raise ValueError("first_k_dense_layers must leave at least one MoE layer")
            groups = self.moe_router_num_groups
            if groups is not None:
                if self.num_experts % groups:
                    raise ValueError(f"num_experts ({self.num_experts}) not divisible by moe_router_num_groups ({groups})")
                if self.moe_router_group_topk is None or self.moe_router_group_topk > groups:
                    raise ValueError("moe_router_group_topk must be set and at most moe_router_num_groups")
            if self.moe_router_type == "deepseek_v2":
                # V2 gates by softmax without expert bias: record what runs (export and metrics read these fields).
                for name, value in (("moe_router_score_function", "softmax"), ("moe_router_enable_expert_bias", False)):
                    if getattr(self, name) != value:
                        if name in self.model_fields_set:
                            raise ValueError(f"{name} must be {value!r} with moe_router_type deepseek_v2")
                        self.__dict__[name] = value
                if any(a < 0 for a in self.moe_aux_loss_coeffs):
                    raise ValueError(f"moe_aux_loss_coeffs must be non-negative, got {self.moe_aux_loss_coeffs}")
                devices = self.moe_num_devices
                if devices is not None and self.num_experts % devices:
                    raise ValueError(f"num_experts ({self.num_experts}) not divisible by moe_num_devices ({devices})")
                if devices is not None and self.moe_device_limit is not None:
                    if self.moe_device_limit > devices:
                        raise ValueError("moe_device_limit must be at most moe_num_devices")
                    if self.moe_router_topk > self.moe_device_limit * (self.num_experts // devices):
                        raise ValueError("moe_router_topk exceeds the experts on moe_device_limit devices")
        return self


# megatron-core's selective-recompute modules that run on the local (non-Transformer-Engine) layer spec. Its
# "moe_act" is left out: it needs grouped GEMM, i.e. Transformer Engine.
RecomputeModule = Literal["core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]


class ParallelConfig(Section):
    """Model-parallel sizes; data parallelism is whatever world size is left over."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    virtual_pipeline_model_parallel_size: int | None = Field(
        None, ge=2, description="Model chunks per pipeline stage for megatron-core's interleaved 1F1B schedule "
                                "(smaller pipeline bubble). Needs pipeline_model_parallel_size >= 2 and num_layers "
                                "divisible by pipeline x virtual size. None: no interleaving.")
    context_parallel_size: int = Field(
        1, ge=1, description="Splits each sequence over this many ranks (2 x CP chunks, causal load balanced); "
                             "attention all-gathers the keys and values of the CP group "
                             "(training/model/attention.py).")
    expert_model_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    decoder_first_pipeline_num_layers: int | None = Field(None, ge=1, description="Layers on the first stage.")
    decoder_last_pipeline_num_layers: int | None = Field(None, ge=1, description="Layers on the last stage.")
    use_distributed_optimizer: bool = True
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    recompute: list[RecomputeModule] = Field(
        default_factory=list,
        description="Activations to recompute in the backward pass instead of keeping (megatron-core's selective "
                    "recompute): core_attn (attention scores; under context parallelism also the gathered keys "
                    "and values), layernorm (the RMSNorms), mla_up_proj (MLA's q/kv up-projections and RoPE), mlp "
                    "(dense FFNs), moe (whole MoE layers), shared_experts. Trades compute for memory; losses are "
                    "unchanged. Empty: keep everything.")

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ValueError("tensor_model_parallel_size > 1 with MoE needs sequence_parallel: true")
        if self.virtual_pipeline_model_parallel_size is not None:
            if self.pipeline_model_parallel_size < 2:
                raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2 "
                                 "(interleaving splits each pipeline stage into model chunks)")
            if self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers:
                raise ValueError("virtual_pipeline_model_parallel_size needs an even split: unset "
                                 "decoder_first/last_pipeline_num_layers")
        return self


# ---------------------------------------------------------------------------------------------------- shared bits --
class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else ./mlruns.")
    experiment: str = "seekflow"
    tags: dict[str, str] = Field(default_factory=dict, description="Tags on every run (dag_run_id, pipeline_run).")


class StageConfig(Section):
    """Fields every stage shares. Each stage writes under `{run_root}/{stage}/` and ends with a manifest."""

    profile: str = Field("tiny", description="Preset the run came from; names the registered model seekflow-<profile>.")
    run_root: str = Field("runs/default", description="Local path or URI under which every stage writes.")
    seed: int = 1234
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------------------- curate --
# Its own module (sources and step parameters); imported here, below Section and StageConfig, which it builds on.
from training.config.curate import CurateConfig  # noqa: E402


# -------------------------------------------------------------------------------------------------------- pretrain --
class OptimizerConfig(Section):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    decay_style: Literal["cosine", "constant", "linear", "deepseek-v3", "multi-step"] = Field(
        "cosine", description="cosine/constant/linear: megatron-core's, over train.steps. deepseek-v3: V3 §4.2 "
                              "(constant_tokens, decay_tokens, lr_tail). multi-step: DeepSeek LLM §2.3 (lr_steps).")
    constant_tokens: float | None = Field(None, ge=0, description="deepseek-v3: tokens at peak lr, warm-up "
                                                                  "included, before the cosine decay (V3: 10e12).")
    decay_tokens: float | None = Field(None, gt=0, description="deepseek-v3: cosine decay to min_lr over this many "
                                                               "tokens (V3: 4.3e12).")
    lr_tail: list[tuple[float, float]] = Field(
        default_factory=list, description="deepseek-v3: [tokens, lr] stages after the decay "
                                          "(V3: [[333e9, 2.2e-5], [167e9, 7.3e-6]]).")
    lr_steps: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.8, 0.316), (0.9, 0.1)],
        description="multi-step: [fraction of the run's tokens, fraction of peak lr] (DeepSeek LLM: 80% → 31.6%, "
                    "90% → 10%).")

    @model_validator(mode="after")
    def _check_schedule(self) -> "OptimizerConfig":
        if self.decay_style == "deepseek-v3" and (self.constant_tokens is None or self.decay_tokens is None):
            raise ValueError("decay_style deepseek-v3 needs optimizer.constant_tokens and optimizer.decay_tokens")
        return self
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="DeepSeek-V3 §4.2: β1 = 0.9.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="DeepSeek-V3 §4.2: β2 = 0.95.")
    weight_decay: float = Field(0.1, ge=0, description="DeepSeek-V3 §4.2: weight decay 0.1.")
    clip_grad: float = Field(1.0, gt=0, description="DeepSeek-V3 §4.2: gradient clipping norm 1.0.")


class BatchSizeRampup(Section):
    """Batch-size warm-up, as megatron-core's `rampup_batch_size` ([start, increment, samples]): the global batch
    starts at start_batch_size and grows by batch_size_increment in equal shares of the ramp's samples."""

    start_batch_size: int = Field(..., ge=1, description="Sequences per step at the start (DeepSeek-V3 §4.2: 3072).")
    batch_size_increment: int = Field(..., ge=1, description="Sequences added at each increase; must divide "
                                                             "global_batch_size - start_batch_size.")
    ramp_tokens: float = Field(..., gt=0, description="Tokens over which the batch reaches global_batch_size "
                                                      "(DeepSeek-V3 §4.2: 469e9).")


class TrainLoopConfig(Section):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    seq_length: int = Field(64, ge=8)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(2, ge=1, description="Sequences per step across data-parallel ranks.")
    log_interval: int = Field(10, ge=1, description="Steps between progress lines and MLflow metrics.")
    save_interval: int = Field(100, ge=1, description="Steps between checkpoints (the last step always saves).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32: everything in float32. bf16: megatron-core mixed precision, bf16 weights and "
                            "activations with fp32 master weights, optimizer state and gradient reduction.")
    peak_flops_per_device: float | None = Field(None, gt=0, description="Peak FLOP/s of one device, for model "
                                                                        "FLOPs utilisation (None: no MFU metric).")
    batch_size_rampup: BatchSizeRampup | None = Field(
        None, description="Ramp the global batch size up from a smaller one (DeepSeek-V3 §4.2: 3072 → 15360 over "
                          "the first 469B tokens; DeepSeek LLM uses none). None: global_batch_size from step 1.")
    async_save: bool = Field(
        False, description="Write checkpoints in a forked process (megatron-core dist_checkpointing's async save) "
                           "while training goes on; the `latest` marker appears only once the save is complete. Off "
                           "by default: on CPU the writer competes with training for the same cores (tiny model, 2 "
                           "cores, a save every step: 0.3 s blocked per save instead of 1 s, but 41 s per run "
                           "instead of 35 s). On GPUs, where training does not use the CPU, turn it on.")

    @model_validator(mode="after")
    def _check_rampup(self) -> "TrainLoopConfig":
        ramp = self.batch_size_rampup
        if ramp is not None:
            gap = self.global_batch_size - ramp.start_batch_size
            if gap <= 0 or gap % ramp.batch_size_increment:
                raise ValueError(f"train.batch_size_rampup: global_batch_size - start_batch_size ({gap}) must be a "
                                 f"positive multiple of batch_size_increment ({ramp.batch_size_increment})")
            for name in ("start_batch_size", "batch_size_increment"):
                if getattr(ramp, name) % self.micro_batch_size:
                    raise ValueError(f"train.batch_size_rampup.{name} ({getattr(ramp, name)}) must be a multiple "
                                     f"of train.micro_batch_size ({self.micro_batch_size})")
            if ramp.ramp_tokens < self.seq_length:
                raise ValueError("train.batch_size_rampup.ramp_tokens is shorter than one sequence")
        return self


class PretrainConfig(StageConfig):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    data_manifest: str | None = Field(None, description="Curate manifest to train on; default {run_root}/curate.")
    init_checkpoint: str | None = Field(
        None, min_length=1, description="Start from these weights instead of a random init: a release directory, an "
        "s3:// URI or a registered version (models:/name/version, models:/name@alias). The optimizer, schedules and "
        "data start fresh; the architecture must match, except the context fields (model.rope_scaling, "
        "model.max_position_embeddings), so that a context extension can start from a 4K model. A rerun that "
        "resumes this stage's own checkpoint ignores it.")

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
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


def stage_sizes(num_layers: int, par: ParallelConfig) -> list[int] | None:
    """Decoder layers on each pipeline stage, megatron's split: the optional uneven first/last stage, the rest
    evenly; None when the rest cannot be split evenly."""
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    middle = par.pipeline_model_parallel_size - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle < 0 or rest < 0 or (middle == 0 and rest) or (middle and rest % middle):
        return None
    return ([first] if first is not None else []) + [rest // middle if middle else 0] * middle \
        + ([last] if last is not None else [])


def stage_layers(num_layers: int, par: ParallelConfig) -> list[list[int]]:
    """0-based decoder layer indices each pipeline stage holds (`stage_sizes`; with virtual pipelining stage s holds
    chunks s, s+P, s+2P, ... of equal size). The layout must be valid (PretrainConfig checks it)."""
    stages = par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp:
        size = num_layers // (stages * vpp)
        return [[i for chunk in range(s, stages * vpp, stages) for i in range(chunk * size, (chunk + 1) * size)]
                for s in range(stages)]
    sizes = stage_sizes(num_layers, par)
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


# -------------------------------------------------------------------------------------------------------- register --
class RegisterConfig(StageConfig):
    checkpoint: str | None = Field(None, description="Checkpoint to register; default the pretrain stage's final one.")
    model_name: str | None = Field(None, description="Registered model name; default seekflow-<profile>.")
    alias: str = Field("candidate", pattern=r"^[a-z][a-z0-9_-]*$")
    parent_version: str | None = Field(None, description="The registered version this checkpoint was trained from "
                                                         "(models:/name/version), recorded as lineage.")
    export_hf: bool = Field(True, description="Log a Hugging Face DeepseekV3 export (hf/) with the version.")


# -------------------------------------------------------------------------------------------------------- evaluate --
# Defaults are sized so the whole stage runs in about a minute on 2 CPU cores with the tiny model; raise them for a
# real model (e.g. humaneval.max_problems: null for all 164).
class HumanEvalSuite(Section):
    """HumanEval (Chen et al. 2021): completions run in a sandboxed subprocess; pass@k, unbiased estimator."""

    enabled: bool = True
    max_problems: int | None = Field(10, ge=1, le=164, description="First N problems in task order (None: all 164).")
    samples_per_problem: int = Field(1, ge=1, le=200, description="n in pass@k; more than 1 needs temperature > 0.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy decoding.")
    ks: list[int] = Field(default_factory=lambda: [1], min_length=1, description="k values of pass@k (each <= n).")
    max_new_tokens: int = Field(48, ge=1, le=2048)
    timeout_s: float = Field(10.0, gt=0, le=300, description="Wall-time limit per program.")
    cpu_s: int = Field(10, ge=1, le=300, description="CPU-time limit per program (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, le=65536, description="Address-space limit per program (RLIMIT_AS).")
    workers: int = Field(2, ge=1, le=64, description="Programs run concurrently.")

    @model_validator(mode="after")
    def _check(self) -> "HumanEvalSuite":
        if self.samples_per_problem > 1 and self.temperature == 0:
            raise ValueError("samples_per_problem > 1 with temperature 0 repeats one greedy sample; set temperature")
        if max(self.ks) > self.samples_per_problem or min(self.ks) < 1:
            raise ValueError(f"every k in ks {self.ks} must be between 1 and samples_per_problem "
                             f"({self.samples_per_problem})")
        return self


class FimSuite(Section):
    """Single-line fill-in-the-middle exact match on held-out stdlib code (DeepSeek-Coder §4.3), PSM prompts."""

    enabled: bool = True
    num_spans: int = Field(20, ge=1, le=10000, description="Held-out lines to infill (one per file, seeded).")
    context_lines: int = Field(12, ge=0, le=200, description="Source lines kept on each side of the hole.")
    max_prefix_tokens: int = Field(96, ge=0, le=65536)
    max_suffix_tokens: int = Field(48, ge=0, le=65536)
    max_new_tokens: int = Field(24, ge=1, le=512)


class PasskeySuite(Section):
    """Passkey retrieval: a 5-digit key hidden in filler at each depth, for each context length (in tokens)."""

    enabled: bool = True
    context_lengths: list[int] = Field(default_factory=lambda: [128, 256], min_length=1,
                                       description="Prompt lengths in tokens; each must fit the model's context.")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1,
                                description="Needle depths, 0 = start of the filler, 1 = end.")
    trials: int = Field(2, ge=1, le=1000, description="Random keys per (length, depth) cell.")
    max_new_tokens: int = Field(8, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> "PasskeySuite":
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        if any(n < 64 for n in self.context_lengths):
            raise ValueError(f"context_lengths must be at least 64 tokens, got {self.context_lengths}")
        return self


class ArithSuite(Section):
    """Generated integer arithmetic, few-shot prompted; accuracy of the extracted answer."""

    enabled: bool = True
    num_problems: int = Field(20, ge=1, le=100000)
    max_operand: int = Field(99, ge=1, le=10**9)
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-", "*"], min_length=1)
    two_step_fraction: float = Field(0.0, ge=0, le=1, description="Share of `(a op b) op c` problems.")
    few_shot: int = Field(2, ge=0, le=16, description="Worked examples before each question.")
    max_new_tokens: int = Field(8, ge=1, le=256)


class PerplexitySuite(Section):
    """Token-weighted perplexity on held-out text: the standard library's docstrings and source files."""

    enabled: bool = True
    sources: list[Literal["stdlib_docstrings", "stdlib_code"]] = Field(
        default_factory=lambda: ["stdlib_docstrings", "stdlib_code"], min_length=1)
    max_documents: int = Field(20, ge=1, le=100000, description="Documents per source.")
    max_tokens: int = Field(2048, ge=16, le=10**9, description="Tokens scored per source.")
    seq_length: int = Field(128, ge=8, le=131072, description="Window length; must fit the model's context.")


class EvaluateConfig(StageConfig):
    checkpoint: str | None = Field(None, description="A release directory, or a registered version: "
                                   "models:/<name>@<alias> or models:/<name>/<version>. Default: the pretrain "
                                   "stage's release checkpoint under run_root.")
    model_version: str | None = Field(None, description="Registered version (models:/<name>/<version> or @alias) to "
                                      "tag with seekflow.eval.* results; default: the checkpoint's, if registered.")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts (or perplexity windows) per forward.")
    humaneval: HumanEvalSuite = Field(default_factory=HumanEvalSuite)
    fim: FimSuite = Field(default_factory=FimSuite)
    passkey: PasskeySuite = Field(default_factory=PasskeySuite)
    arith: ArithSuite = Field(default_factory=ArithSuite)
    perplexity: PerplexitySuite = Field(default_factory=PerplexitySuite)

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        for ref in (self.checkpoint, self.model_version):
            if ref and ref.startswith("models:/") and not re.fullmatch(r"models:/[^/@]+(/\d+|@[\w-]+)", ref):
                raise ValueError(f"{ref!r} is not models:/<name>/<version> or models:/<name>@<alias>")
        if self.model_version and not self.model_version.startswith("models:/"):
            raise ValueError("model_version must be models:/<name>/<version> or models:/<name>@<alias>")
        return self


# --------------------------------------------------------------------------------------------------------- promote --
class GateRule(Section):
    """One gated metric: the version tag `seekflow.eval.<metric>` that the evaluate stage writes."""

    metric: str = Field(..., pattern=r"^[\w-]+\.[\w.-]+$",
                        description="<suite>.<metric>, e.g. humaneval.pass_at_1 (eval/<suite>/<metric> also accepted).")
    higher_is_better: bool = Field(..., description="False for losses and perplexities.")
    max_regression: float = Field(0.0, ge=0, description="Largest absolute step in the worse direction, versus the "
                                                         "current champion, that still promotes.")
    min: float | None = Field(None, description="Absolute lower bound: below it the candidate is refused.")
    max: float | None = Field(None, description="Absolute upper bound: above it the candidate is refused.")

    @model_validator(mode="before")
    @classmethod
    def _metric_name(cls, data):
        metric = data.get("metric") if isinstance(data, dict) else None
        if isinstance(metric, str) and metric.startswith("eval/"):   # the MLflow metric name of the same value
            data = {**data, "metric": metric[len("eval/"):].replace("/", ".", 1)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "GateRule":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.metric}: min ({self.min}) exceeds max ({self.max})")
        return self


def _default_gates() -> list[GateRule]:
    accuracy = dict(higher_is_better=True, max_regression=0.02, min=0.0, max=1.0)
    perplexity = dict(higher_is_better=False, max_regression=0.5, min=1.0)
    return [GateRule(metric="perplexity.stdlib_code", **perplexity),
            GateRule(metric="perplexity.stdlib_docstrings", **perplexity),
            GateRule(metric="humaneval.pass_at_1", **accuracy), GateRule(metric="fim.exact_match", **accuracy),
            GateRule(metric="passkey.accuracy", **accuracy), GateRule(metric="arith.accuracy", **accuracy)]


class PromoteConfig(StageConfig):
    """Eval-gated promotion with registry aliases: candidate → staging (metrics present, within bounds) → champion
    (no gated metric worse than the current champion's by more than its max_regression)."""

    model_name: str | None = Field(None, description="Registered model; default: the register stage's (its manifest "
                                                     "under run_root), else seekflow-<profile>.")
    version: str | None = Field(None, pattern=r"^(\d+|@?[a-z][a-z0-9_-]*)$",
                                description="Version number or alias (e.g. candidate) to promote; default: the "
                                            "version the register stage's manifest names, else the candidate alias.")
    gates: list[GateRule] = Field(default_factory=_default_gates, min_length=1,
                                  description="Gated metrics (seekflow.eval.<metric> version tags).")
    allow_first_champion: bool = Field(True, description="With no champion yet, a candidate within the absolute "
                                                         "bounds becomes champion (false: it stops at staging).")
    fail_on_refusal: bool = Field(False, description="Exit non-zero when the candidate is refused (the decision is "
                                                     "recorded either way).")
    request_timeout_s: float = Field(10.0, gt=0, le=300, description="Tracking-server reachability check timeout.")

    @model_validator(mode="before")
    @classmethod
    def _version_text(cls, data):
        if isinstance(data, dict) and isinstance(data.get("version"), int):   # `--set version=3` parses as YAML
            data = {**data, "version": str(data["version"])}
        return data

    @model_validator(mode="after")
    def _unique_metrics(self) -> "PromoteConfig":
        metrics = [g.metric for g in self.gates]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"gates: each metric may appear once, got {metrics}")
        return self


STAGES: dict[str, type[StageConfig]] = {
    "curate": CurateConfig,
    "pretrain": PretrainConfig,
    "register": RegisterConfig,
    "evaluate": EvaluateConfig,
    "promote": PromoteConfig,
}
SHARED_KEYS = tuple(StageConfig.model_fields)


class PipelineConfig(Section):
    """The whole run: shared fields once, then one section per stage. Presets are documents of this shape.

    Shared fields (profile, run_root, seed, tracking) are copied into every stage section before validation, so
    `pipeline.pretrain` is a complete `PretrainConfig`, exactly what `python -m training pretrain` receives.
    """

    profile: str = "tiny"
    run_root: str = "runs/default"
    seed: int = 1234
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def stage(self, name: str) -> StageConfig:
        return {"curate": self.curate, "pretrain": self.pretrain, "register": self.register_stage,
                "evaluate": self.evaluate, "promote": self.promote}[name]

    curate: CurateConfig = Field(default_factory=CurateConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    # `register` would shadow BaseModel.register (ABCMeta), so the attribute is `register_stage`.
    register_stage: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    @model_validator(mode="before")
    @classmethod
    def _share_common_fields(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            shared = {k: data[k] for k in SHARED_KEYS if k in data}
            for stage in STAGES:
                section = data.get(stage) or {}   # `register` arrives by its alias
                if isinstance(section, dict):
                    data[stage] = {**shared, **section}
        return data
