"""Pruning masks for the `compress` stage (issue 20, CAP): which weights are zero, how many, and keeping them zero.

  - **Schedule.** The sparsity rises over training along the cubic schedule of Zhu and Gupta ("To prune, or not to
    prune", 2017), which movement pruning and CAP's unstructured runs use: s_t = s_f + (s_0 - s_f)(1 - t/T)^3 between
    the warm-up and the end, then s_f. CAP's structured runs step through 10%, 20%, ..., 90% instead (its
    PRUNE_SEQUENCE); `stepped_sparsity` gives that.
  - **Unstructured** (`unstructured_masks`): per weight matrix, the lowest-scoring elements are zeroed, scores being
    |w| (magnitude) or the accumulated movement -w·∂L/∂w (Sanh et al., movement pruning; CAP's unstructured runs).
    The count is exact: round(sparsity × elements) per matrix, ties broken by position.
  - **Structured** (`neuron_masks`, `head_masks`): whole FFN neurons (an fc1 gate row, its up row and the fc2 column
    they feed) of the dense FFNs and of the shared and routed experts, so a pruned expert computes a narrower SwiGLU;
    and whole MLA attention heads (the head's query rows, its key and value rows in the kv up-projection, and the
    output-projection columns its value feeds). Both are scored by the L2 norm of their weights (the authors score
    heads and neurons by gradient importance, which needs an extra pass over the data).
  - **Which weights** (`prunable`, `model_masks`): the decoder's weight matrices. Embeddings, the output head,
    norms, routers and the MTP module are never pruned.
  - **Keeping them zero.** `apply_masks` zeroes the masked weights and their gradients. The stage calls it on the
    gradients before the optimizer step (so no update is computed for them) and on the weights after it (Adam's
    moments, weight decay and any rounding cannot bring a pruned weight back).
"""
from __future__ import annotations

import torch


def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0, warmup: int = 0,
                   cooldown: int = 0) -> float:
    """Target sparsity at `step`: `initial` through the warm-up, then the cubic rise to `final`, reached `cooldown`
    steps before the end."""
    if not 0 <= initial <= final < 1:
        raise ValueError(f"sparsities must satisfy 0 <= initial ({initial}) <= final ({final}) < 1")
    span = total_steps - warmup - cooldown
    if span <= 0:
        raise ValueError(f"no steps left to prune over: {total_steps} steps, warm-up {warmup}, cool-down {cooldown}")
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def stepped_sparsity(step: int, total_steps: int, final: float, stages: int = 9) -> float:
    """CAP's structured schedule: `stages` equal steps up to `final` (10%, 20%, ..., 90% for final 0.9), each held
    for an equal share of the steps."""
    stage = min(step * stages // max(total_steps, 1) + 1, stages)
    return final * stage / stages


def lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A bool mask of `scores`' shape, True (kept) everywhere but the round(sparsity × n) lowest scores (exactly that
    many; ties broken by position)."""
    pruned = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if pruned:
        order = torch.argsort(scores.reshape(-1).float(), stable=True)
        keep[order[:pruned]] = False
    return keep.view_as(scores)


def unstructured_masks(weights: dict[str, torch.Tensor], sparsity: float,
                       movement: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{name: kept} per weight matrix: magnitude, or `movement` scores where given."""
    return {name: lowest(movement[name] if movement is not None else w.abs(), sparsity)
            for name, w in weights.items()}


def neuron_masks(fc1: torch.Tensor, fc2: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of one SwiGLU expert's fc1 [2 x ffn, h] (gate rows, then up rows) and fc2 [h, ffn] that prune whole
    neurons: the round(sparsity × ffn) neurons whose three weight vectors have the smallest summed squares."""
    ffn = fc2.shape[1]
    if fc1.shape[0] != 2 * ffn:
        raise ValueError(f"fc1 has {fc1.shape[0]} rows; a SwiGLU expert of width {ffn} has {2 * ffn}")
    gate, up = fc1[:ffn].float(), fc1[ffn:].float()
    norms = gate.pow(2).sum(1) + up.pow(2).sum(1) + fc2.float().pow(2).sum(0)
    kept = lowest(norms, sparsity)
    return kept.repeat(2)[:, None].expand_as(fc1), kept[None, :].expand_as(fc2)


@torch.no_grad()
def apply_masks(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], gradients: bool = False) -> None:
    """Zero the masked elements of each named parameter (`gradients`: of its gradient, megatron's `main_grad` too)."""
    for name, kept in masks.items():
        param = params[name]
        if gradients:
            for grad in (param.grad, getattr(param, "main_grad", None)):
                if grad is not None:
                    grad.mul_(kept.to(grad.dtype))
        else:
            param.mul_(kept.to(param.dtype))


def sparsity_of(tensors) -> float:
    """The share of exact zeros over the given tensors."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    return zeros / max(total, 1)


def prunable(named_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's weight matrices among `named_params` (an unwrapped GPT module's names)."""
    return {name: p for name, p in named_params.items()
            if name.startswith("decoder.layers.") and name.endswith(".weight") and p.dim() == 2
            and ".router." not in name}


def head_masks(q: torch.Tensor, kv_up: torch.Tensor, proj: torch.Tensor, heads: int, sparsity: float,
               min_heads: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of one MLA block's query projection q [heads x (d_h + d_h^R), ·], kv up-projection kv_up
    [heads x (d_h + d_v), d_c] and output projection proj [h, heads x d_v] that prune min(round(sparsity x heads),
    heads - min_heads) whole heads: those whose weights have the smallest summed squares (megatron lays each of
    them out head-major)."""
    if q.shape[0] % heads or kv_up.shape[0] % heads or proj.shape[1] % heads:
        raise ValueError(f"cannot split q {tuple(q.shape)}, kv_up {tuple(kv_up.shape)}, proj {tuple(proj.shape)} "
                         f"into {heads} heads")
    per_head = [t.float().reshape(heads, -1).pow(2).sum(1) for t in (q, kv_up)]
    norms = per_head[0] + per_head[1] + proj.float().reshape(proj.shape[0], heads, -1).pow(2).sum((0, 2))
    pruned = min(round(sparsity * heads), heads - min_heads)
    kept = lowest(norms, pruned / heads) if pruned > 0 else torch.ones(heads, dtype=torch.bool, device=q.device)
    rows = lambda t: kept.repeat_interleave(t.shape[0] // heads)[:, None].expand_as(t)   # noqa: E731
    return rows(q), rows(kv_up), kept.repeat_interleave(proj.shape[1] // heads)[None, :].expand_as(proj)


def model_masks(named_params: dict[str, torch.Tensor], structure: str, sparsity: float, heads: int,
                min_heads: int = 1) -> dict[str, torch.Tensor]:
    """{name: kept} for every weight the structure prunes, at `sparsity` (see the module docstring)."""
    weights = prunable(named_params)
    if structure == "unstructured":
        return unstructured_masks(weights, sparsity)
    masks: dict[str, torch.Tensor] = {}
    for name, fc1 in weights.items():
        if name.endswith(".linear_fc1.weight"):
            fc2_name = name.replace(".linear_fc1.", ".linear_fc2.")
            masks[name], masks[fc2_name] = neuron_masks(fc1, weights[fc2_name], sparsity)
        elif name.endswith(".self_attention.linear_proj.weight"):
            block = name.removesuffix("linear_proj.weight")
            q_name = next((block + q for q in ("linear_q_up_proj.weight", "linear_q_proj.weight")
                           if block + q in weights), None)
            if q_name is None or block + "linear_kv_up_proj.weight" not in weights:
                raise ValueError(f"{block}: structured pruning removes multi-latent attention heads; this block is "
                                 f"not MLA (model.multi_latent_attention)")
            masks[q_name], masks[block + "linear_kv_up_proj.weight"], masks[name] = head_masks(
                weights[q_name], weights[block + "linear_kv_up_proj.weight"], weights[name], heads, sparsity,
                min_heads)
    return masks
