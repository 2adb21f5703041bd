"""The model's architecture: a DeepSeek-V3-shaped decoder (MLA, DeepSeekMoE, MTP) and its YaRN context extension."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import Section


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
    vocab_merges: int | None = Field(
        None, ge=0, description="Train on DeepSeek's BPE cut to its first N merges: a subset of its token ids, mapped "
        "to embedding rows (training/vocabulary.py), for small models whose output head would otherwise dominate "
        "their compute. The curated data must use the same N (curate's vocab_merges). None: the full tokenizer.")
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
