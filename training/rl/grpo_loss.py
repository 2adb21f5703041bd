"""GRPO's objective: group-relative advantages, the k3 KL estimator and the clipped surrogate, averaged over tokens in
one of three ways. Torch only and model-free: the policy-update train module hands it per-token log-probs.

    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ_it Â_i, clip(ρ_it, 1-ε, 1+ε) Â_i) - β D_KL,it ],   ρ_it = π_θ / π_θold
    (DeepSeekMath, Shao et al. 2024, eq. 3; DeepSeek-R1, Nature 2025, eq. 1)

DeepSeek-R1's eq. 1 writes the ratio and the KL per output, π_θ(o_i|q); like every implementation we know (TRL,
verl, OpenRLHF) we read it as DeepSeekMath eq. 3, per token and averaged over the output's tokens. The loss is -J.
"""
from __future__ import annotations

import enum

import torch
from torch import Tensor

# Published hyperparameters. Keys are this module's argument names plus the trainer's (lr, group_size). Only the
# values a paper states are here; each comment says where, and which values are ours.
PRESETS: dict[str, dict[str, object]] = {
    # DeepSeekMath §4.2 ("Training and Evaluating DeepSeekMath-RL"): policy lr 1e-6, KL coefficient 0.04, 64 outputs
    # per question, max length 1024, training batch size 1024, a single policy update per exploration stage.
    # ε is NOT given there: 0.2 is PPO's default (Schulman et al. 2017, §6.1). With one update per stage the ratio
    # is 1 at the update and the clip never binds, so the choice is moot for this recipe.
    "deepseekmath": {"lr": 1e-6, "beta": 0.04, "group_size": 64, "max_tokens": 1024, "batch_size": 1024,
                     "epsilon": 0.2, "aggregation": "sequence", "scale_by_std": True},
    # DeepSeek-R1 (Nature 2025, Methods, training details of DeepSeek-R1-Zero): lr 3e-6, KL coefficient 0.001,
    # sampling temperature 1, 16 outputs per question, 32 questions a step (batch 512), max length 32,768 tokens
    # (65,536 after step 8.2k), the reference model replaced by the policy every 400 steps. ε = 10 is the clip ratio
    # that report gives for R1-Zero as we recall it; it was not checked against the primary text when this was
    # written, so treat it as a config value to verify. The arXiv v1 (2501.12948) gives none of these numbers.
    "deepseek_r1_zero": {"lr": 3e-6, "beta": 0.001, "group_size": 16, "max_tokens": 32768, "batch_size": 512,
                         "temperature": 1.0, "epsilon": 10.0, "aggregation": "sequence", "scale_by_std": True},
}


class Aggregation(str, enum.Enum):
    """How per-token objectives become one number (a config string works too: Aggregation("token"))."""

    SEQUENCE = "sequence"   # DeepSeekMath eq. 3, R1 eq. 1: mean over each output's tokens, then over outputs
    TOKEN = "token"         # DAPO (Yu et al. 2025) eq. 8: sum over every response token / their count
    DR_GRPO = "dr_grpo"     # Dr. GRPO (Liu et al. 2025): sum over each output's tokens / max_tokens, mean over outputs


def group_advantages(rewards: Tensor, *, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Outcome-supervised advantages, one per output (DeepSeekMath §4.1.2, R1 eq. 3):
    Â_i = (r_i - mean(r)) / (std(r) + eps) within each row of `rewards` [num_groups, G].

    std is the unbiased (Bessel-corrected, n-1) standard deviation, torch.std's default and what TRL and open-r1 use;
    the papers do not say which. `eps` (TRL's 1e-4) keeps near-identical groups finite; pass 0 for the bare formula.
    A group whose rewards are all equal (G = 1 included) carries no signal: its advantages are exactly 0.
    `scale_by_std=False` is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training" §3.1): Â_i = r_i - mean,
    dropping the std division that over-weights too-easy and too-hard questions."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std and rewards.shape[1] > 1:
        centered = centered / (rewards.std(dim=1, keepdim=True) + eps)
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centered), centered)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π_θ || π_ref) estimate π_ref/π_θ - log(π_ref/π_θ) - 1 (DeepSeekMath eq. 4, R1 eq. 2; Schulman's
    "k3", http://joschu.net/blog/kl-approx.html): unbiased for samples from π_θ and never negative, since
    e^x - x - 1 >= 0. Computed in log space, x = ref_logp - logp."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              epsilon: float, beta: float, aggregation: Aggregation | str,
              max_tokens: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """-J for a batch of B outputs (all groups flattened), and detached statistics.

    logp, old_logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy being trained (with grad), the
    policy that sampled them, and the reference (None allowed when beta == 0). advantages: [B], one per output,
    broadcast over its tokens. mask: [B, T] bool/float, 1 on response tokens; an output cut off at the length limit
    has no EOS and simply covers its tokens to the end. Padding may hold anything (even inf or nan): it is zeroed
    before use. max_tokens: the generation budget, Dr. GRPO's constant denominator (required for "dr_grpo").

    Per token: min(ρ Â, clip(ρ, 1-ε, 1+ε) Â) - β k3, ρ = exp(logp - old_logp). π_θold is a constant (old_logp is
    detached): with old_logp = logp.detach(), ρ = 1 and the gradient is Â ∇log π_θ, the on-policy case."""
    aggregation = Aggregation(aggregation)
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the KL penalty is against the reference policy)")
    for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logp has {tuple(logp.shape)}")
    if logp.dim() != 2 or advantages.shape != logp.shape[:1]:
        raise ValueError(f"logp must be [B, T] and advantages [B]; got {tuple(logp.shape)} and "
                         f"{tuple(advantages.shape)}")
    if aggregation is Aggregation.DR_GRPO and not (max_tokens and max_tokens > 0):
        raise ValueError("aggregation 'dr_grpo' divides by the generation budget: pass max_tokens > 0")

    response = mask.bool()
    weight = response.to(logp.dtype)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero the padding first, so that garbage there cannot reach the loss or (as 0 * inf) the gradient.
    logp = torch.where(response, logp, zero)
    old_logp = torch.where(response, old_logp.detach().to(logp.dtype), zero)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)
    # PPO's clipped surrogate (Schulman et al. 2017, eq. 7): the pessimistic min of the two terms.
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * adv
    per_token = torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, torch.where(response, ref_logp.detach().to(logp.dtype), zero))
        if beta != 0:
            # The KL is a term of the loss, per token, not a reward penalty (DeepSeekMath §4.1.1).
            per_token = per_token - beta * kl
    per_token = per_token * weight

    lengths = weight.sum(dim=1)
    if aggregation is Aggregation.SEQUENCE:
        # 1/|o_i| then 1/G; an empty output (no response tokens) contributes 0 rather than 0/0.
        objective = (per_token.sum(dim=1) / lengths.clamp(min=1)).mean()
    elif aggregation is Aggregation.TOKEN:
        # Every token weighs the same, so long outputs are not diluted (DAPO §3.3, "token-level policy gradient").
        objective = per_token.sum() / lengths.sum().clamp(min=1)
    else:
        # A constant in place of |o_i| removes GRPO's length bias (Dr. GRPO §3.1); Â should be unscaled too.
        objective = (per_token.sum(dim=1) / max_tokens).mean()
    return -objective, _stats(ratio.detach(), adv, kl, weight, epsilon)


def _stats(ratio: Tensor, adv: Tensor, kl: Tensor | None, weight: Tensor, epsilon: float) -> dict[str, Tensor]:
    """Means over response tokens. A token counts as clipped where the clipped term is the one min() picks and it is
    flat in θ: ρ > 1+ε with Â > 0, or ρ < 1-ε with Â < 0 (TRL's clip_ratio/high and /low)."""
    count = weight.sum().clamp(min=1)

    def mean(values: Tensor) -> Tensor:
        return (values.to(weight.dtype) * weight).sum() / count

    high = (ratio > 1 + epsilon) & (adv > 0)
    low = (ratio < 1 - epsilon) & (adv < 0)
    stats = {"clip_fraction": mean(high | low), "clip_high_fraction": mean(high), "clip_low_fraction": mean(low),
             "ratio_mean": mean(ratio), "ratio_max": torch.where(weight.bool(), ratio, 0).max(),
             "response_tokens": weight.sum()}
    if kl is not None:
        stats["kl"] = mean(kl.detach())
    return stats
