"""Count a DeepSeek-shaped model's parameters from `ModelConfig` alone (pure Python: no torch, no megatron).

The count mirrors, matrix by matrix, what `training.model.build.build_gpt` instantiates in megatron-core (a test
builds the tiny model and checks equality to the last parameter), so it can size a 671B model on a laptop:

- embedding (vocab x d) and a separate output head (vocab x d); no weight tying in DeepSeek models;
- attention per layer: MLA (DeepSeek-V2 §2.1) — q down (d x d'_c) + q latent RMSNorm + q up (d'_c x n_h(d_h+d_h^R)),
  or a plain q projection when q_lora_rank is None; kv down (d x (d_c + d_h^R), the decoupled RoPE key rides along);
  kv latent RMSNorm; kv up (d_c x n_h(d_h + d_v)); output projection (n_h d_v x d). Without MLA: fused QKV + output;
- input and post-attention RMSNorms per layer, the final RMSNorm;
- FFN: SwiGLU, three matrices; dense layers use ffn_hidden_size, MoE layers hold a router (E x d), E routed and
  N_s shared experts of moe_ffn_hidden_size (the expert bias of aux-loss-free balancing is a buffer, not a parameter);
- MTP (DeepSeek-V3 §2.2): per depth a projection M_k (2d -> d), RMSNorms on the hidden state and on the embedding,
  one transformer block (shaped like the last decoder layer), and the RMSNorm before the shared output head
  (megatron's `final_layernorm`, the released checkpoint's `shared_head.norm`). Embedding and head are shared.

"Activated" is what one token touches: one row of the input embedding, everything else outside the routed experts
(output head included: every logit is computed), plus K_r of the E routed experts. This matches DeepSeek-V2/V3's
headline figures best (see tests/training/model/test_params.py); DeepSeekMoE 16B's 2.8B counts the whole embedding table,
so `activated_with_embedding_table` is printed too.
The papers' headline totals exclude V3's MTP module, so `total` and `activated` do too; `mtp` is reported apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Exact integer counts by component. `total`/`activated` exclude MTP, as the papers' headline numbers do."""

    parts: dict[str, int] = field(default_factory=dict)       # main model, every parameter
    active_parts: dict[str, int] = field(default_factory=dict)  # main model, per token
    mtp: int = 0
    mtp_activated: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def activated(self) -> int:
        return sum(self.active_parts.values())

    @property
    def activated_with_embedding_table(self) -> int:
        """Activated counting the whole input embedding table (the DeepSeekMoE paper's convention, it seems)."""
        return self.activated - self.active_parts["embedding"] + self.parts["embedding"]

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp


def attention_params(m: ModelConfig) -> int:
    """One attention block, its latent RMSNorms included (the layer's input RMSNorm is counted apart)."""
    d, h = m.hidden_size, m.num_attention_heads
    if not m.multi_latent_attention:
        head = d // h                                    # megatron's kv_channels default
        return 3 * d * h * head + h * head * d           # fused QKV + output projection
    qk = m.qk_head_dim + m.qk_pos_emb_head_dim
    if m.q_lora_rank is None:
        q = d * h * qk                                   # W^Q (and W^QR) straight from the hidden state
    else:
        q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk   # W^DQ, q latent RMSNorm, W^UQ + W^QR
    kv = d * (m.kv_lora_rank + m.qk_pos_emb_head_dim)   # W^DKV and the decoupled RoPE key W^KR
    kv += m.kv_lora_rank                                 # kv latent RMSNorm
    kv += m.kv_lora_rank * h * (m.qk_head_dim + m.v_head_dim)   # W^UK and W^UV
    out = h * m.v_head_dim * d                           # W^O
    return q + kv + out


def swiglu_params(d: int, ffn: int) -> int:
    return 3 * d * ffn                                   # gate, up (fused as fc1 in megatron) and down


def _layer(m: ModelConfig, moe: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(all, activated) parameters of one transformer layer, by component."""
    d = m.hidden_size
    attn = attention_params(m)
    norms = 2 * d                                        # input and post-attention (pre-MLP) RMSNorms
    if not moe:
        ffn = swiglu_params(d, m.ffn_hidden_size)
        return ({"attention": attn, "norms": norms, "dense_ffn": ffn},
                {"attention": attn, "norms": norms, "dense_ffn": ffn})
    expert = swiglu_params(d, m.moe_ffn_hidden_size)
    router = m.num_experts * d
    shared = m.moe_shared_experts * expert
    every = {"attention": attn, "norms": norms, "router": router, "shared_experts": shared,
             "routed_experts": m.num_experts * expert}
    active = dict(every, routed_experts=m.moe_router_topk * expert)
    return every, active


def _is_moe(m: ModelConfig, index: int) -> bool:
    return m.num_experts is not None and index >= m.first_k_dense_layers


def _add(into: dict[str, int], part: dict[str, int]) -> None:
    for key, value in part.items():
        into[key] = into.get(key, 0) + value


def count_params(m: ModelConfig) -> ParamCount:
    d = m.hidden_size
    parts = {"embedding": m.vocab_size * d, "output_head": m.vocab_size * d, "final_norm": d}
    active = dict(parts, embedding=d)                   # a token reads one embedding row; the head is all used
    for i in range(m.num_layers):
        every, act = _layer(m, _is_moe(m, i))
        _add(parts, every)
        _add(active, act)
    mtp = mtp_active = 0
    if m.mtp_num_layers:
        # megatron builds each MTP block from the last decoder layer's spec (MoE in every DeepSeek model).
        every, act = _layer(m, _is_moe(m, m.num_layers - 1))
        module = 2 * d * d + 3 * d                       # M_k, hnorm + enorm, and the norm before the shared head
        mtp = m.mtp_num_layers * (module + sum(every.values()))
        mtp_active = m.mtp_num_layers * (module + sum(act.values()))
    return ParamCount(parts=parts, active_parts=active, mtp=mtp, mtp_activated=mtp_active)


def format_count(name: str, c: ParamCount) -> str:
    """The `python -m training params` report: one `label value B` line each, in billions."""
    b = lambda n: f"{n / 1e9:.2f} B"   # noqa: E731
    lines = [f"model     {name}",
             f"total     {b(c.total)}   ({c.total:,} parameters, MTP excluded as in the papers)",
             f"activated {b(c.activated)}   ({c.activated:,} per token; one embedding row)",
             f"  (activated counting the whole embedding table: {c.activated_with_embedding_table / 1e9:.2f} B)"]
    if c.mtp:   # only models with multi-token prediction modules
        lines.append(f"mtp       {b(c.mtp)}   ({c.mtp:,}; {c.mtp_activated:,} activated; embedding and head shared)")
    for key in ("embedding", "output_head", "attention", "norms", "dense_ffn", "router", "shared_experts",
                "routed_experts"):
        if key in c.parts:
            lines.append(f"  {key:<15}{b(c.parts[key]):>10}   activated {b(c.active_parts[key]):>9}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- scaling laws --
# DeepSeek LLM (arXiv:2401.02954) §3.1 eq. (1): near-optimal batch size (tokens) and learning rate for compute C, and
# §3.2 eq. (4): compute-optimal model scale M (non-embedding FLOPs/token) and data scale D (tokens), with C = M·D.
# Provenance: the arXiv text is not reachable from here, so the constants were checked three ways: two independent
# restatements of the paper (a from-scratch reimplementation's README quoting eq. 1 and eq. 4, and a DeepSeek-method
# calculator quoting eq. 1); the paper's own Table 2, whose batch sizes and learning rates for the 7B and 67B models
# eq. 1 gives back within 5% and 1.5% (tests/training/model/test_params.py); and C = M·D, which eq. 4 must satisfy:
# 0.1715 x 5.8316 = 1.0001 and 0.5243 + 0.4757 = 1.
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271     # B_opt = 0.2920 · C^0.3271   (tokens)
LR_COEF, LR_EXP = 0.3118, -0.1250          # η_opt = 0.3118 · C^-0.1250
MODEL_COEF, MODEL_EXP = 0.1715, 0.5243     # M_opt = 0.1715 · C^0.5243   (non-embedding FLOPs/token)
DATA_COEF, DATA_EXP = 5.8316, 0.4757       # D_opt = 5.8316 · C^0.4757   (tokens)


@dataclass(frozen=True)
class Plan:
    compute: float
    batch_tokens: float
    learning_rate: float
    model_flops_per_token: float
    data_tokens: float


def plan(compute: float) -> Plan:
    if not compute > 0:
        raise ValueError(f"--compute must be a positive number of FLOPs, got {compute}")
    return Plan(compute=compute, batch_tokens=BATCH_COEF * compute ** BATCH_EXP,
                learning_rate=LR_COEF * compute ** LR_EXP, model_flops_per_token=MODEL_COEF * compute ** MODEL_EXP,
                data_tokens=DATA_COEF * compute ** DATA_EXP)


def non_embedding_flops_per_token(m: ModelConfig, seq_length: int) -> int:
    """DeepSeek LLM §3.2's M for this model: 6 x activated non-embedding parameters (the vocabulary head excluded)
    plus the attention-score term 6 · n_layer · n_h (d_qk + d_v) · l_seq (for plain attention 12 · n_layer · d · l_seq,
    the paper's own formula)."""
    c = count_params(m)
    dense_params = c.activated - c.active_parts["embedding"] - c.active_parts["output_head"]
    if m.multi_latent_attention:
        width = m.num_attention_heads * (m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim)
    else:
        width = 2 * m.hidden_size
    return 6 * dense_params + 6 * m.num_layers * width * seq_length


def format_plan(p: Plan, preset: str | None = None, m: ModelConfig | None = None, seq_length: int = 4096) -> str:
    lines = [f"compute       {p.compute:.4g} FLOPs",
             f"batch_size    {p.batch_tokens:.4g} tokens   (B_opt = {BATCH_COEF}·C^{BATCH_EXP}, DeepSeek LLM eq. 1)",
             f"learning_rate {p.learning_rate:.4g}   (η_opt = {LR_COEF}·C^{LR_EXP}, DeepSeek LLM eq. 1)",
             f"model_scale   {p.model_flops_per_token:.4g} non-embedding FLOPs/token   "
             f"(M_opt = {MODEL_COEF}·C^{MODEL_EXP}, eq. 4)",
             f"data_scale    {p.data_tokens:.4g} tokens   (D_opt = {DATA_COEF}·C^{DATA_EXP}, eq. 4)"]
    if m is not None:
        flops = non_embedding_flops_per_token(m, seq_length)
        tokens = p.compute / flops
        sequences = max(1, round(p.batch_tokens / seq_length))
        lines += [f"preset        {preset}: M = {flops:.4g} FLOPs/token at seq_length {seq_length} "
                  f"({flops / p.model_flops_per_token:.3g}x M_opt)",
                  f"preset_tokens {tokens:.4g} tokens = C / M",
                  f"preset_batch  {sequences} sequences of {seq_length} (B_opt / seq_length)",
                  f"preset_steps  {max(1, round(tokens / (sequences * seq_length)))}"]
    return "\n".join(lines) + "\n"
