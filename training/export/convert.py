"""ModelConfig and weights ↔ Hugging Face DeepseekV3: the names, the splits and what HF cannot represent.

Pure torch + config (no megatron): both directions are plain dict → dict functions, so they are testable alone.

How megatron-core (local spec, MLA, SwiGLU, sigmoid router) lines up with `DeepseekV3ForCausalLM`:
- MLA: linear_q_down_proj/q_layernorm/linear_q_up_proj = q_a_proj/q_a_layernorm/q_b_proj; linear_kv_down_proj
  (output [kv_lora_rank; rope dim]) = kv_a_proj_with_mqa; kv_layernorm = kv_a_layernorm; linear_kv_up_proj (per head
  [qk nope; v]) = kv_b_proj. Both per-head layouts are [nope; rope] and copy as they are.
- RoPE: megatron's MLA de-interleaves the rope dims (x[0::2], x[1::2]) before rotate-half, exactly what HF does with
  `rope_interleave: true` (DeepSeek's own weight layout), so no permutation is needed.
- YaRN (`model.rope_scaling`) is `rope_scaling` {type: yarn, factor, original_max_position_embeddings, beta_fast,
  beta_slow, mscale, mscale_all_dim}, as in DeepSeek-V3's released config; both apply the softmax scale mscale².
- SwiGLU: megatron's fused linear_fc1 is [gate; up] along the output dim; HF keeps gate_proj and up_proj apart.
- Router: router.weight = gate.weight, expert_bias = e_score_correction_bias; megatron normalises the sigmoid top-k
  scores whenever topk > 1 (norm_topk_prob) and multiplies by moe_router_topk_scaling_factor (routed_scaling_factor).
- MTP module k is written as decoder layer num_layers + k, as DeepSeek's release does: enorm, hnorm, eh_proj
  (input [enorm(embedding); hnorm(hidden)] in both), shared_head.norm and a full decoder layer. The embedding and
  head are shared with the main model, so they are not repeated there. `DeepseekV3ForCausalLM` ignores the layer.
"""
from __future__ import annotations

import torch

from training.config import ModelConfig

# The fields of ModelConfig that only training reads: kept beside config.json (seekflow_model.json) for re-import.
TRAINING_ONLY = ("name", "init_method_std", "moe_router_bias_update_rate", "moe_aux_loss_coeff",
                 "mtp_loss_scaling_factor", "moe_router_enable_expert_bias", "moe_router_bias_update_until_tokens",
                 "mtp_loss_scaling_factor_after", "mtp_loss_scaling_switch_tokens")
HF_NORM_EPS = 1e-6   # HF builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps


class ExportError(ValueError):
    """A checkpoint or directory that cannot be converted; the message names the path or the field."""

    permanent = True


# ------------------------------------------------------------------------------------------------------- config --
def hf_config(model: ModelConfig, *, bos_token_id: int, eos_token_id: int) -> dict:
    """config.json for `model`, or an ExportError naming the first field HF DeepseekV3 cannot represent."""
    _check_representable(model)
    topk, groups = model.moe_router_topk, model.moe_router_num_groups
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "moe_intermediate_size": model.moe_ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_nextn_predict_layers": model.mtp_num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_attention_heads,
        "n_shared_experts": model.moe_shared_experts,
        "n_routed_experts": model.num_experts,
        "num_experts_per_tok": topk,
        # No groups means one group holding every expert: HF then selects from all of them.
        "n_group": groups or 1,
        "topk_group": model.moe_router_group_topk if groups else 1,
        "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
        "norm_topk_prob": topk > 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": model.first_k_dense_layers,
        "moe_layer_freq": 1,
        "q_lora_rank": model.q_lora_rank,
        "kv_lora_rank": model.kv_lora_rank,
        "qk_nope_head_dim": model.qk_head_dim,
        "qk_rope_head_dim": model.qk_pos_emb_head_dim,
        "v_head_dim": model.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rope_theta": model.rotary_base,
        "rope_scaling": _hf_rope_scaling(model),
        "rope_interleave": True,
        "rms_norm_eps": model.norm_epsilon,
        "initializer_range": model.init_method_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _hf_rope_scaling(model: ModelConfig) -> dict | None:
    """YaRN as DeepSeek's released config.json writes it (transformers reads it into `rope_parameters`)."""
    yarn = model.rope_scaling
    if yarn is None:
        return None
    return {"type": "yarn", "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow, "mscale": yarn.mscale,
            "mscale_all_dim": yarn.mscale_all_dim}


def _yarn_from_hf(config: dict) -> dict | None:
    """The `rope_scaling` field of an HF config (legacy `rope_scaling` or transformers 5's `rope_parameters`).

    Without both `mscale` and `mscale_all_dim`, HF scales cos/sin by 0.1 ln s + 1 whatever `mscale` says; megatron
    computes that from mscale = 1 over mscale_all_dim = 0, so a lone mscale_all_dim (which also scales the softmax
    in both) has no megatron equivalent and is refused."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ExportError(f"config.json rope type {kind!r}: only YaRN RoPE scaling is supported")
    if params.get("attention_factor") is not None:
        raise ExportError(f"config.json rope_scaling.attention_factor={params['attention_factor']!r}: an explicit "
                          "attention factor has no megatron equivalent")
    if params.get("truncate", True) is not True:
        raise ExportError(f"config.json rope_scaling.truncate={params['truncate']!r}: megatron always rounds YaRN's "
                          "correction range to whole dims")
    if params.get("factor") is None:
        raise ExportError("config.json rope_scaling lacks 'factor', the YaRN scaling factor s")
    mscale, mscale_all_dim = params.get("mscale") or 0.0, params.get("mscale_all_dim") or 0.0
    if mscale_all_dim and not mscale:
        raise ExportError("config.json rope_scaling sets mscale_all_dim without mscale, which megatron cannot mirror")
    return dict(factor=params["factor"], original_max_position_embeddings=params["original_max_position_embeddings"],
                beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
                mscale=mscale if mscale_all_dim else 1.0, mscale_all_dim=mscale_all_dim)


def _check_representable(model: ModelConfig) -> None:
    def refuse(field: str, why: str):
        raise ExportError(f"model.{field}: {why}; Hugging Face DeepseekV3 cannot represent this model")

    if model.vocab_merges is not None:   # rows are not ids: transformers would read row r as DeepSeek's token r
        refuse("vocab_merges", f"is {model.vocab_merges}: the embedding rows are a mapped subset of DeepSeek's token "
                               f"ids (training/vocabulary.py), not the ids themselves")
    if not model.multi_latent_attention:
        refuse("multi_latent_attention", "is false, but DeepseekV3 attention is MLA only")
    if model.num_experts is None:
        refuse("num_experts", "is None (a dense model), but DeepseekV3's MTP and later layers are MoE")
    if model.moe_router_score_function != "sigmoid":
        refuse("moe_router_score_function", f"is {model.moe_router_score_function!r}; DeepseekV3 routes by sigmoid")
    if model.moe_shared_experts < 1:
        refuse("moe_shared_experts", "is 0; every DeepseekV3 MoE layer has a shared expert")
    if model.norm_epsilon != HF_NORM_EPS:
        refuse("norm_epsilon", f"is {model.norm_epsilon}; HF fixes the q/kv latent norms' eps at {HF_NORM_EPS}")
    groups, group_topk, topk = model.moe_router_num_groups, model.moe_router_group_topk, model.moe_router_topk
    if model.num_experts // (groups or 1) < 2:
        refuse("moe_router_num_groups", "leaves fewer than 2 experts per group; HF ranks groups by their top-2")
    # megatron ranks groups by the sum of their top (topk / group_topk) scores (DeepSeek-V3 §2.1.2); HF hard-codes
    # the top 2. They agree when that ratio is 2, or when every group is selected anyway.
    if groups and group_topk < groups and topk // group_topk != 2:
        refuse("moe_router_topk", f"/ moe_router_group_topk = {topk} // {group_topk} = {topk // group_topk}, but "
                                  "HF ranks expert groups by their top-2 scores (needs topk = 2 x group_topk)")


def model_config_from_hf(config: dict, training_fields: dict | None = None) -> ModelConfig:
    """The ModelConfig of an HF DeepseekV3 config.json; `training_fields` (seekflow_model.json) fills the rest."""
    if config.get("model_type") != "deepseek_v3":
        raise ExportError(f"config.json model_type={config.get('model_type')!r}: expected 'deepseek_v3'")
    try:
        fields = _fields_from_hf(config)
    except KeyError as err:
        raise ExportError(f"config.json lacks {err.args[0]!r}, which a DeepseekV3 config needs") from None
    for key in TRAINING_ONLY:
        if training_fields and key in training_fields:
            fields[key] = training_fields[key]
    try:
        model = ModelConfig(**fields)
    except ValueError as err:
        raise ExportError(f"config.json describes a model seekflow cannot build: {err}") from None
    _check_representable(model)
    return model


def _fields_from_hf(config: dict) -> dict:
    def need(key: str, expected, why: str):
        if config.get(key, expected) != expected:
            raise ExportError(f"config.json {key}={config.get(key)!r}: {why}")

    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ExportError(f"config.json quantization_config (quant_method {method!r}): quantised weights (such as "
                          "DeepSeek-V3's blockwise FP8 release) cannot be imported; dequantise them to bf16 first")
    need("rope_interleave", True, "megatron's MLA expects DeepSeek's interleaved rope layout")
    need("hidden_act", "silu", "megatron's SwiGLU is silu-gated")
    need("attention_bias", False, "seekflow models have no linear biases")
    need("tie_word_embeddings", False, "seekflow keeps a separate output head")
    need("scoring_func", "sigmoid", "only sigmoid routing is supported")
    need("num_key_value_heads", config["num_attention_heads"], "MLA has one kv head per attention head")
    topk = config["num_experts_per_tok"]
    need("norm_topk_prob", topk > 1, "megatron normalises sigmoid top-k weights exactly when topk > 1")
    rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    groups = config.get("n_group") or 1
    scaling = config.get("routed_scaling_factor", 1.0)
    return dict(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"], ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
        rotary_base=float(rope_theta), rope_scaling=_yarn_from_hf(config),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        init_method_std=config.get("initializer_range", 0.006), multi_latent_attention=True,
        q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
        qk_head_dim=config["qk_nope_head_dim"], qk_pos_emb_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"], num_experts=config["n_routed_experts"], moe_router_topk=topk,
        moe_ffn_hidden_size=config["moe_intermediate_size"], moe_shared_experts=config.get("n_shared_experts", 1),
        first_k_dense_layers=config.get("first_k_dense_replace", 0), moe_router_score_function="sigmoid",
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=config.get("topk_group") if groups > 1 else None,
        moe_router_topk_scaling_factor=None if scaling == 1.0 else scaling,
        mtp_num_layers=config.get("num_nextn_predict_layers", 0),
    )


# ------------------------------------------------------------------------------------------------------ weights --
def _layer_rules(model: ModelConfig, hf: str, mc: str, moe: bool) -> list[tuple[tuple[str, ...], str]]:
    """(HF names, megatron name) for one decoder layer; two HF names are the [gate; up] halves of a fused fc1."""
    def glu(hf_mlp: str, mc_mlp: str):
        return [((f"{hf_mlp}gate_proj.weight", f"{hf_mlp}up_proj.weight"), f"{mc_mlp}linear_fc1.weight"),
                ((f"{hf_mlp}down_proj.weight",), f"{mc_mlp}linear_fc2.weight")]

    att, sa = f"{hf}self_attn.", f"{mc}self_attention."
    rules = [((f"{hf}input_layernorm.weight",), f"{mc}input_layernorm.weight")]
    if model.q_lora_rank is not None:
        rules += [((f"{att}q_a_proj.weight",), f"{sa}linear_q_down_proj.weight"),
                  ((f"{att}q_a_layernorm.weight",), f"{sa}q_layernorm.weight"),
                  ((f"{att}q_b_proj.weight",), f"{sa}linear_q_up_proj.weight")]
    else:
        rules.append(((f"{att}q_proj.weight",), f"{sa}linear_q_proj.weight"))
    rules += [((f"{att}kv_a_proj_with_mqa.weight",), f"{sa}linear_kv_down_proj.weight"),
              ((f"{att}kv_a_layernorm.weight",), f"{sa}kv_layernorm.weight"),
              ((f"{att}kv_b_proj.weight",), f"{sa}linear_kv_up_proj.weight"),
              ((f"{att}o_proj.weight",), f"{sa}linear_proj.weight"),
              ((f"{hf}post_attention_layernorm.weight",), f"{mc}pre_mlp_layernorm.weight")]
    if not moe:
        return rules + glu(f"{hf}mlp.", f"{mc}mlp.")
    rules += [((f"{hf}mlp.gate.weight",), f"{mc}mlp.router.weight"),
              ((f"{hf}mlp.gate.e_score_correction_bias",), f"{mc}mlp.router.expert_bias")]
    for e in range(model.num_experts):
        rules += glu(f"{hf}mlp.experts.{e}.", f"{mc}mlp.experts.local_experts.{e}.")
    return rules + glu(f"{hf}mlp.shared_experts.", f"{mc}mlp.shared_experts.")


def weight_rules(model: ModelConfig) -> list[tuple[tuple[str, ...], str]]:
    """Every weight of the model as (HF names, megatron name), in HF's natural order."""
    rules = [(("model.embed_tokens.weight",), "embedding.word_embeddings.weight")]
    for i in range(model.num_layers):
        rules += _layer_rules(model, f"model.layers.{i}.", f"decoder.layers.{i}.", i >= model.first_k_dense_layers)
    rules += [(("model.norm.weight",), "decoder.final_layernorm.weight"), (("lm_head.weight",), "output_layer.weight")]
    for k in range(model.mtp_num_layers):
        hf, mc = f"model.layers.{model.num_layers + k}.", f"mtp.layers.{k}."
        rules += [((f"{hf}enorm.weight",), f"{mc}enorm.weight"), ((f"{hf}hnorm.weight",), f"{mc}hnorm.weight"),
                  ((f"{hf}eh_proj.weight",), f"{mc}eh_proj.weight"),
                  ((f"{hf}shared_head.norm.weight",), f"{mc}final_layernorm.weight")]
        rules += _layer_rules(model, hf, f"{mc}transformer_layer.", moe=True)
    return rules


def to_hf(state: dict, model: ModelConfig) -> dict[str, torch.Tensor]:
    """megatron-core state dict (one process, full tensors) → HF tensors (contiguous copies, float32)."""
    weights = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out, used = {}, set()
    for hf_names, mc_name in weight_rules(model):
        if mc_name not in weights:
            if mc_name.endswith("router.expert_bias") and not model.moe_router_enable_expert_bias:
                out[hf_names[0]] = torch.zeros(model.num_experts, dtype=torch.float32)   # no bias = zero bias
                continue
            raise ExportError(f"checkpoint has no tensor {mc_name}: it does not match its seekflow_model.json")
        used.add(mc_name)
        tensor = weights[mc_name].detach().to("cpu", torch.float32)
        parts = tensor.chunk(2, dim=0) if len(hf_names) == 2 else (tensor,)
        for name, part in zip(hf_names, parts):
            out[name] = part.clone().contiguous()
    unmapped = sorted(set(weights) - used)
    if unmapped:   # a new module in build.py must get a rule here, never be dropped silently
        raise ExportError(f"no Hugging Face name for megatron tensors {unmapped[:5]} ({len(unmapped)} in all)")
    return out


# DeepSeek's own release repeats the shared embedding and head inside its MTP layer; they carry nothing new.
_MTP_DUPLICATES = ("embed_tokens.weight", "shared_head.head.weight")


def from_hf(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors → megatron-core state dict entries (no _extra_state), checking that every tensor is accounted for."""
    out, used = {}, set()
    for hf_names, mc_name in weight_rules(model):
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise ExportError(f"Hugging Face weights lack {missing[0]}")
        used.update(hf_names)
        parts = [tensors[n].to(torch.float32) for n in hf_names]
        if mc_name.endswith("router.expert_bias") and not model.moe_router_enable_expert_bias:
            if parts[0].abs().max() > 0:
                raise ExportError(f"{hf_names[0]} is non-zero but model.moe_router_enable_expert_bias is false")
            continue
        out[mc_name] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    extra = sorted(n for n in set(tensors) - used
                   if not (n.startswith("model.layers.") and n.endswith(_MTP_DUPLICATES)))
    if extra:
        raise ExportError(f"Hugging Face weights {extra[:5]} ({len(extra)} in all) have no place in this model")
    return out
