"""Build a megatron-core GPTModel from `ModelConfig` + `ParallelConfig`. No process-group or hardware logic here."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import ModelConfig, ParallelConfig


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, use_cpu_initialization: bool,
                       bf16: bool = False):
    """Translate our config into megatron-core's (MLA)TransformerConfig (`bf16`: mixed precision, see build_gpt)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    moe = model.num_experts is not None
    common = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        init_method_std=model.init_method_std,
        add_bias_linear=False,          # required with MoE; DeepSeek uses no linear biases anyway
        gated_linear_unit=True,         # SwiGLU
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,   # what pipeline stages send each other
        use_cpu_initialization=use_cpu_initialization,
        # These fusions need Transformer Engine or Apex; megatron-core falls back to plain torch with them off.
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
        recompute_granularity="selective" if parallel.recompute else None,
        recompute_modules=list(parallel.recompute) or None,
    )
    if moe:
        common.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=(model.moe_shared_experts * model.moe_ffn_hidden_size) or None,
            moe_layer_freq=[0] * model.first_k_dense_layers + [1] * (model.num_layers - model.first_k_dense_layers),
            moe_router_score_function=model.moe_router_score_function,
            moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_num_groups=model.moe_router_num_groups,
            moe_router_group_topk=model.moe_router_group_topk,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_pre_softmax=model.moe_router_score_function == "softmax",
            moe_router_dtype="fp32",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="seq_aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_token_dispatcher_type=parallel.moe_token_dispatcher_type,
            # megatron's grouped MLPs need Transformer Engine: its SequentialMLP, or our GroupedExperts (build_gpt)
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
        if model.moe_router_type == "deepseek_v2":
            # Our router (training/model/routers.py) does softmax gating, device limits and V2's three balance
            # losses itself: megatron's bias, groups and aux loss stay off so TopKRouter adds nothing of its own.
            common.update(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                          moe_router_enable_expert_bias=False, moe_router_num_groups=None,
                          moe_router_group_topk=None, moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    if model.mtp_num_layers:
        common.update(mtp_num_layers=model.mtp_num_layers, mtp_loss_scaling_factor=model.mtp_loss_scaling_factor)
    if not model.multi_latent_attention:
        return TransformerConfig(**common)
    return MLATransformerConfig(
        **common,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        # RMSNorm on the compressed q and kv latents (DeepSeek-V2 §2.1; HF's q_a_layernorm / kv_a_layernorm).
        qk_layernorm=True,
        rotary_base=model.rotary_base,
        **_rope(model),
    )


def _rope(model: ModelConfig) -> dict:
    """megatron-core MLA's RoPE settings: plain RoPE, or YaRN (which also scales MLA's softmax by its mscale²)."""
    yarn = model.rope_scaling
    if yarn is None:
        return {"rope_type": "rope"}
    return dict(rope_type="yarn", rotary_scaling_factor=yarn.factor,
                original_max_position_embeddings=yarn.original_max_position_embeddings,
                beta_fast=yarn.beta_fast, beta_slow=yarn.beta_slow, mscale=yarn.mscale,
                mscale_all_dim=yarn.mscale_all_dim)


def build_gpt(model: ModelConfig, parallel: ParallelConfig, *, use_cpu_initialization: bool = True,
              seed: int | None = None, vp_stage: int | None = None, bf16: bool = False, fp8: bool = False):
    """The GPTModel for this pipeline stage (pre/post process follow the pipeline rank), or, with a virtual pipeline,
    its model chunk `vp_stage` (chunk v of stage p holds the layers of virtual stage v x PP + p).

    With `bf16` the config asks for megatron-core's mixed precision; the caller wraps the model in its
    `Float16Module` (bf16 weights, fp32 outputs) and gives the optimizer fp32 master weights. With `fp8` the linear
    layers of the blocks run their GEMMs in FP8 (training/model/fp8_spec.py: DeepSeek-V3 §3.3).

    With `seed`, its weights are redrawn layout-invariantly (training/model/init.py): any parallel layout starts
    from the model one process would build. Without it, megatron's own (layout-dependent) init stays."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    if model.vocab_merges is not None:   # a vocabulary subset: its rows must fit (the full one is checked by curate)
        from training.vocabulary import vocabulary

        vocabulary(model.vocab_merges).check_fits(model.vocab_size)
    config = transformer_config(model, parallel, use_cpu_initialization=use_cpu_initialization, bf16=bf16)
    use_te = False  # the "local" spec: pure megatron-core + torch (Transformer Engine is not installed here)
    block_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    if model.num_experts is not None and model.moe_router_type == "deepseek_v2":
        _use_deepseek_v2_router(block_spec, model, parallel)
    if model.num_experts is not None and parallel.moe_grouped_gemm:
        if fp8:
            raise ValueError("parallel.moe_grouped_gemm: grouped expert GEMMs in FP8 are not built; with "
                             "train.precision fp8 the experts run sequentially (moe_grouped_gemm: false)")
        _use_grouped_experts(block_spec)
    _use_sdpa_attention(block_spec)
    mtp_spec = None
    if model.mtp_num_layers:
        mtp_spec = get_gpt_mtp_block_spec(config, block_spec.layer_specs[-1], use_transformer_engine=use_te,
                                          vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,   # DeepSeek models keep a separate output head
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )
    if fp8:
        from training.model.fp8_spec import use_fp8_linears

        use_fp8_linears(gpt)
    if seed is not None:
        from training.model.init import reinitialize

        reinitialize(gpt, config, seed)
    if model.multi_latent_attention:   # packed samples' own rotary positions (a no-op outside packed batches)
        from training.model.packing import use_sample_positions

        use_sample_positions(gpt)
    return gpt, config


def _use_deepseek_v2_router(block_spec, model: ModelConfig, parallel: ParallelConfig) -> None:
    """Swap megatron's TopKRouter for DeepSeekV2Router in every MoE layer spec (the MTP spec copies the last one)."""
    import functools

    from training.model.routers import DeepSeekV2Router, V2RoutingSettings

    settings = V2RoutingSettings(
        num_devices=model.moe_num_devices or parallel.expert_model_parallel_size,
        device_limit=model.moe_device_limit,
        aux_loss_coeffs=tuple(model.moe_aux_loss_coeffs),
        capacity_factor=model.moe_token_drop_capacity_factor,
    )
    for layer_spec in block_spec.layer_specs:
        moe = getattr(layer_spec.submodules, "mlp", None)
        if moe is not None and hasattr(getattr(moe, "submodules", None), "router"):
            moe.submodules.router = functools.partial(DeepSeekV2Router, settings=settings)


def _use_grouped_experts(block_spec) -> None:
    """Swap megatron's SequentialMLP for GroupedExperts (training/model/grouped_experts.py) in every MoE layer spec
    (the MTP spec copies the last one)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from training.model.grouped_experts import GroupedExperts

    for layer_spec in block_spec.layer_specs:
        experts = getattr(getattr(getattr(layer_spec.submodules, "mlp", None), "submodules", None), "experts", None)
        if experts is not None and experts.module is SequentialMLP:
            experts.module = GroupedExperts


def _use_sdpa_attention(block_spec) -> None:
    """Every layer (and so the MTP layer, which copies the last) attends through `CausalSdpaAttention` instead of
    megatron-core's local DotProductAttention: fused SDPA kernels instead of a materialised [s x s] softmax, and
    context parallelism, which the local DotProductAttention refuses (only Transformer Engine's ring attention has
    it). Building patches nothing: the MTP loss's token count under CP is `training.parallel.patches`' business."""
    from training.model.attention import CausalSdpaAttention

    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = CausalSdpaAttention
