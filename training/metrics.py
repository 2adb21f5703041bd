"""Pretraining metrics beyond the loss: expert load and MaxVio per MoE layer, router expert-bias norms, model FLOPs
per token and utilisation, and the expert-load heatmap.

Expert load comes from the routers' token counts. megatron-core's TopKRouter (the V3 path, with expert bias) adds each
micro-batch's routing map to `local_tokens_per_expert` (for the aux-loss-free bias update) and zeroes it at the end of
`finalize_model_grads`, so the ExpertLoad callback (training/train/callbacks.py) snapshots the counts just before that
call, through the GPT train module's grad-finalize hooks (`ExpertLoadTracker.snapshot`). Our
DeepSeekV2Router has no bias and keeps its own `load_counts` (same tokens: each rank's own, sequence-parallel shard
included), which megatron does not know: the snapshot zeroes those itself. Snapshots stay on each rank until a log step;
then one `all_gather_object` sums them over the ranks that hold each layer (data/tensor/expert parallel replicas) and
brings every pipeline stage's layers to rank 0.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import ModelConfig

MAX_PER_EXPERT_METRICS = 1024   # beyond this many (layer, expert) pairs, per-expert loads go to the heatmap only


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i Load_i − mean Load) / mean Load over the experts (last dim): 0 is perfect balance.
    (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"; DeepSeek-V3 §4.5.2.)"""
    mean = load.float().mean(dim=-1)
    return (load.float().max(dim=-1).values - mean) / mean.clamp(min=1e-9)


def _router_label(name: str) -> str:
    """'module.decoder.layers.2.mlp.router' → 'layer2'; 'module.mtp.layers.0.…router' → 'mtp0' (local index)."""
    parts = name.split(".")
    kind = "mtp" if "mtp" in parts else "layer"
    index = parts[parts.index("layers") + 1] if "layers" in parts else "0"
    return f"{kind}{index}"


V2_COUNTS = "load_counts"   # DeepSeekV2Router's buffer (training/model/routers.py); the tracker zeroes it
V3_COUNTS = "local_tokens_per_expert"   # megatron's TopKRouter buffer; finalize_model_grads zeroes it


def _counts_buffer(module: torch.nn.Module) -> str | None:
    if getattr(module, V2_COUNTS, None) is not None:
        return V2_COUNTS
    if getattr(module, V3_COUNTS, None) is not None and hasattr(module, "expert_bias"):
        return V3_COUNTS
    return None


class ExpertLoadTracker:
    """Per-step token counts per expert for every MoE router of this rank's model chunk."""

    def __init__(self, model: torch.nn.Module):
        self.routers: list[tuple[str, torch.nn.Module, str]] = []   # (label, router, its counts buffer)
        for name, module in model.named_modules():
            if (buffer := _counts_buffer(module)) is not None:
                number = getattr(module, "layer_number", None)
                label = _router_label(name)
                if label.startswith("layer") and number is not None:
                    label = f"layer{number}"   # global layer number: unique across pipeline stages
                self.routers.append((label, module, buffer))
        self.window: list[torch.Tensor] = []   # one [routers, experts] tensor per step
        self.total: torch.Tensor | None = None   # whole-run counts, [labels, experts], filled by collect()
        self.labels: list[str] = []

    def snapshot(self) -> None:
        """Record this step's counts (call right before finalize_model_grads zeroes megatron's); zero V2's."""
        if self.routers:
            rows = []
            for _, module, buffer in self.routers:
                counts = getattr(module, buffer)
                rows.append(counts.detach().float().cpu().clone())
                if buffer == V2_COUNTS:
                    counts.zero_()   # nothing else resets it: the next step starts from zero
            self.window.append(torch.stack(rows))

    def collect(self) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """Every rank calls this at a log step. Returns ({label: [steps, experts] global counts}, {label: bias norm})
        on every rank (all ranks see the same), or None where no rank has a router. Clears the window."""
        local = ({label: torch.stack([w[i] for w in self.window]) for i, (label, *_) in enumerate(self.routers)}
                 if self.window else {},
                 {label: float(m.expert_bias.detach().float().norm()) for label, m, _ in self.routers
                  if getattr(m, "expert_bias", None) is not None})   # V2 routers have no bias
        self.window = []
        parts = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        loads: dict[str, torch.Tensor] = {}
        norms: dict[str, float] = {}
        for counts, bias_norms in parts:
            for label, value in counts.items():
                loads[label] = loads[label] + value if label in loads else value
            norms.update(bias_norms)
        if not loads and not norms:
            return None
        loads = dict(sorted(loads.items(), key=lambda kv: _sort_key(kv[0])))
        stacked = torch.stack([v.sum(dim=0) for v in loads.values()]) if loads else None
        if stacked is not None:
            self.total = stacked if self.total is None or self.total.shape != stacked.shape else self.total + stacked
            self.labels = list(loads)
        return loads, norms


def _sort_key(label: str) -> tuple[int, int]:
    kind, index = ("mtp", label[3:]) if label.startswith("mtp") else ("layer", label[5:])
    return (1 if kind == "mtp" else 0, int(index) if index.isdigit() else 0)


def load_metrics(loads: dict[str, torch.Tensor], norms: dict[str, float]) -> dict[str, float]:
    """MLflow metrics from one window: per-layer MaxVio (mean over the window's steps) and its mean over layers,
    per-expert mean tokens per step (small models), expert-bias norms."""
    out: dict[str, float] = {}
    vios = []
    per_expert = sum(v.shape[-1] for v in loads.values()) <= MAX_PER_EXPERT_METRICS
    for label, counts in loads.items():
        vio = float(max_violation(counts).mean())
        out[f"moe/maxvio/{label}"] = vio
        vios.append(vio)
        if per_expert:
            for expert, tokens in enumerate(counts.float().mean(dim=0).tolist()):
                out[f"moe/load/{label}/expert{expert}"] = tokens
    if vios:
        out["moe/maxvio"] = sum(vios) / len(vios)
    for label, norm in norms.items():
        out[f"moe/expert_bias_norm/{label}"] = norm
    if norms:
        out["moe/expert_bias_norm"] = sum(norms.values()) / len(norms)
    return out


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token of an MLA + MoE decoder (with MTP modules), counting matmuls only.

    A matmul with an [m, n] weight costs 2·m·n FLOPs per token forward and 4·m·n backward (input and weight
    gradients), so each *activated* matmul parameter costs 6 FLOPs per token (Kaplan et al.; PaLM appendix B).
    Activated matmul parameters per layer (h hidden, n_h heads, d_h + d_h^R query/key dims, d_v value dim):
      MLA   q: h·d'_c + d'_c·n_h·(d_h+d_h^R)  (or h·n_h·(d_h+d_h^R) without q compression)
            kv down: h·(d_c + d_h^R); kv up: d_c·n_h·(d_h + d_v); out: n_h·d_v·h
      FFN   dense: 3·h·ffn (SwiGLU); MoE: 3·h·ffn_e·(K_r + N_s) + router h·N_r
    plus the output head h·V (once for the model and once per MTP module, whose 2h→h projection adds 2h²).
    Attention scores are not parameters: per layer and token, QKᵀ costs 2·n_h·(d_h+d_h^R)·s and AV 2·n_h·d_v·s
    forward over s keys, ×3 for training; causal masking halves the useful work (s/2 keys on average).
    """
    h, n_h = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        d_qk, d_v = model.qk_head_dim + model.qk_pos_emb_head_dim, model.v_head_dim
        q = (h * model.q_lora_rank + model.q_lora_rank * n_h * d_qk) if model.q_lora_rank else h * n_h * d_qk
        attn = (q + h * (model.kv_lora_rank + model.qk_pos_emb_head_dim)
                + model.kv_lora_rank * n_h * (model.qk_head_dim + d_v) + n_h * d_v * h)
    else:
        d_qk = d_v = h // n_h
        attn = 4 * h * h
    dense_ffn = 3 * h * model.ffn_hidden_size
    if model.num_experts is None:
        moe_ffn, dense_layers = dense_ffn, model.num_layers
    else:
        moe_ffn = (3 * h * model.moe_ffn_hidden_size * (model.moe_router_topk + model.moe_shared_experts)
                   + h * model.num_experts)
        dense_layers = model.first_k_dense_layers
    moe_layers = model.num_layers - dense_layers
    mtp = model.mtp_num_layers
    params = (model.num_layers + mtp) * attn + dense_layers * dense_ffn + (moe_layers + mtp) * moe_ffn
    params += h * model.vocab_size * (1 + mtp) + mtp * 2 * h * h
    attention_scores = 3 * 2 * n_h * (d_qk + d_v) * (seq_length / 2) * (model.num_layers + mtp)
    return 6.0 * params + attention_scores


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops_per_device: float | None, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (nan when no peak is configured)."""
    if not peak_flops_per_device:
        return math.nan
    return tokens_per_s * flops_per_tok / (peak_flops_per_device * devices)


def expert_load_heatmap(total: torch.Tensor, labels: list[str], path: Path) -> Path:
    """A layers × experts PNG of each expert's share of its layer's load, relative to the mean (1.0 = balanced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = (total.float() / total.float().mean(dim=-1, keepdim=True).clamp(min=1e-9)).numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * relative.shape[1] + 2), max(2.5, 0.35 * len(labels) + 1.5)))
    image = ax.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_title("expert load / mean load (whole run)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
