"""DeepSeek-V2 routing (arXiv:2405.04434 §2.2) as a router for megatron-core's MoE layer.

megatron-core's `TopKRouter` covers DeepSeek-V3 (sigmoid gating, expert bias, node-limited routing, sequence-wise
balance loss) and that stays our default. DeepSeek-V2 needs what it lacks: the device- and communication-level balance
losses (eq. 15-20) and device-level token dropping (§2.2.4). `DeepSeekV2Router` subclasses `TopKRouter` so the MoE
layer, the dispatchers and the loss trackers treat it like megatron's own: `forward` returns `probs` and
`routing_map`, both [tokens, experts], and each balance loss rides on `probs` through `MoEAuxLossAutoScaler` and is
logged (divided by its α) under its own name in `get_moe_layer_wise_logging_tracker()`.

The math lives in plain torch functions (tested against hand computation without megatron); the router class is
created on first access, so importing this module does not import megatron before the CPU shim is applied.

"Devices" are the contiguous expert groups E_1..E_D: the expert-parallel ranks on a cluster, or emulated groups
(`moe_num_devices`) when experts are not split over processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_NAMES = ("expert_balance_loss", "device_balance_loss", "comm_balance_loss")


@dataclass(frozen=True)
class V2RoutingSettings:
    num_devices: int                        # D, expert groups ("devices") E_1..E_D, contiguous, equal sizes
    device_limit: int | None                # M, devices each token may reach (None: no limit)
    aux_loss_coeffs: tuple[float, float, float]   # α1, α2, α3
    capacity_factor: float | None           # per-device capacity factor for token dropping (None: never drop)


# ------------------------------------------------------------------------------------------------------- the math --
def device_limited_topk(scores: torch.Tensor, topk: int, num_devices: int, device_limit: int | None) -> torch.Tensor:
    """Boolean routing map [T, N]: top-K experts per token among the M devices holding its highest affinities.

    V2 §2.2.2: "for each token, we first select M devices that have experts with the highest affinity scores in them.
    Then, we perform top-K selection among experts on these M devices." A device's score is therefore the maximum
    affinity among its experts (V3's node-limited routing ranks by the sum of the top K_r/M instead).
    """
    tokens, experts = scores.shape
    if device_limit is not None and device_limit < num_devices:
        device_scores = scores.view(tokens, num_devices, experts // num_devices).amax(dim=-1)
        chosen = torch.topk(device_scores, k=device_limit, dim=-1).indices
        device_mask = torch.zeros_like(device_scores, dtype=torch.bool).scatter(1, chosen, True)
        expert_mask = device_mask.repeat_interleave(experts // num_devices, dim=1)
        scores = scores.masked_fill(~expert_mask, float("-inf"))
    top = torch.topk(scores, k=topk, dim=-1).indices
    return torch.zeros(tokens, experts, dtype=torch.bool, device=scores.device).scatter(1, top, True)


def balance_terms(scores: torch.Tensor, routing_map: torch.Tensor, topk: int, num_devices: int,
                  device_limit: int | None, valid: torch.Tensor | None = None, counts_reduce=None):
    """f_i, P_i, f'_d, P'_d, f''_d, P''_d of V2 eq. 13-14, 16-17, 19-20 for one sequence ([T, N] inputs).

    f_i   = N/(K T) Σ_t 1(token t selects expert i)          P_i   = 1/T Σ_t s_{i,t}
    f'_d  = 1/|E_d| Σ_{i∈E_d} f_i                            P'_d  = Σ_{i∈E_d} P_i
    f''_d = D/(M T) Σ_t 1(token t is sent to device d)       P''_d = Σ_{i∈E_d} P_i
    `valid` masks out padding tokens; `counts_reduce` sums counts over ranks that hold other parts of the sequence.
    """
    tokens, experts = scores.shape
    per_device = experts // num_devices
    limit = device_limit if device_limit is not None else num_devices
    if valid is not None:
        scores, routing_map = scores * valid[:, None], routing_map & valid[:, None]
    expert_counts = routing_map.sum(dim=0).float()
    device_counts = routing_map.view(tokens, num_devices, per_device).any(dim=-1).sum(dim=0).float()
    num_tokens = torch.tensor(float(tokens if valid is None else valid.sum()), device=scores.device)
    if counts_reduce is not None:
        expert_counts, device_counts, num_tokens = (counts_reduce(x) for x in (expert_counts, device_counts,
                                                                              num_tokens))
    num_tokens = num_tokens.clamp(min=1)
    f = expert_counts * experts / (topk * num_tokens)
    p = scores.sum(dim=0) / num_tokens
    f_dev = f.view(num_devices, per_device).mean(dim=-1)
    p_dev = p.view(num_devices, per_device).sum(dim=-1)
    f_comm = device_counts * num_devices / (limit * num_tokens)
    return f, p, f_dev, p_dev, f_comm, p_dev


def balance_losses(scores: torch.Tensor, routing_map: torch.Tensor, *, seq_length: int, topk: int, num_devices: int,
                   device_limit: int | None, padding_mask: torch.Tensor | None = None, counts_reduce=None):
    """(Σ f_i P_i, Σ f'_d P'_d, Σ f''_d P''_d), each averaged over the sequences of the micro-batch, without α.

    V2 eq. 12, 15, 18 (before α1, α2, α3). T is "the number of tokens in a sequence", so the statistics are per
    sequence; tokens are megatron's [seq, batch] order flattened, as the MoE layer hands them to the router.
    """
    experts = scores.shape[-1]
    scores_sb = scores.view(seq_length, -1, experts)
    map_sb = routing_map.view(seq_length, -1, experts)
    valid_sb = None if padding_mask is None else ~padding_mask.view(seq_length, -1)
    totals = torch.zeros(3, device=scores.device)
    for b in range(scores_sb.shape[1]):
        f, p, f_dev, p_dev, f_comm, p_comm = balance_terms(
            scores_sb[:, b], map_sb[:, b], topk, num_devices, device_limit,
            None if valid_sb is None else valid_sb[:, b], counts_reduce)
        totals = totals + torch.stack([(f * p).sum(), (f_dev * p_dev).sum(), (f_comm * p_comm).sum()])
    return tuple(totals / scores_sb.shape[1])


def device_token_drop(scores: torch.Tensor, routing_map: torch.Tensor, topk: int, num_devices: int,
                      capacity_factor: float) -> torch.Tensor:
    """Keep-mask after V2 §2.2.4 device-level token dropping.

    Each device's budget is the average load, capacity_factor · T·K/D token-expert assignments; beyond it the
    assignments with the lowest affinity s_{i,t} on that device are dropped. (The budget is computed from the tokens
    this rank routes.)
    """
    tokens, experts = scores.shape
    per_device = experts // num_devices
    capacity = min(math.ceil(capacity_factor * tokens * topk / num_devices), tokens * per_device)
    ranked = scores.detach().masked_fill(~routing_map, float("-inf"))
    ranked = ranked.view(tokens, num_devices, per_device).permute(1, 0, 2).reshape(num_devices, -1)
    keep_idx = torch.topk(ranked, k=capacity, dim=-1).indices
    keep = torch.zeros_like(ranked, dtype=torch.bool).scatter(1, keep_idx, True)
    keep = keep.view(num_devices, tokens, per_device).permute(1, 0, 2).reshape(tokens, experts)
    return keep & routing_map


# ------------------------------------------------------------------------------------------------------ the router --
def _define_router():
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    from megatron.core.transformer.moe.router import TopKRouter

    class DeepSeekV2Router(TopKRouter):
        """Softmax gating over all routed experts (V2 eq. 11), device-limited top-K (§2.2.2), the three balance
        losses (eq. 12-20) and device-level token dropping in training only (§2.2.4).

        Gate weights are the affinities themselves, g_{i,t} = s_{i,t} for the selected experts (V2 eq. 10; not
        renormalised), times `moe_router_topk_scaling_factor` when set.
        """

        def __init__(self, config, pg_collection=None, *, settings: V2RoutingSettings):
            super().__init__(config=config, pg_collection=pg_collection)
            per_device, rest = divmod(config.num_moe_experts, settings.num_devices)
            if rest:
                raise ValueError(f"{config.num_moe_experts} experts cannot be split over {settings.num_devices} "
                                 f"devices")
            limit = settings.device_limit
            if limit is not None and (limit > settings.num_devices or self.topk > limit * per_device):
                raise ValueError(f"device limit M={limit} with {settings.num_devices} devices of {per_device} "
                                 f"experts cannot hold top-{self.topk} routing")
            self.settings = settings
            # Tokens routed to each expert since metrics.ExpertLoadTracker last read (and zeroed) it: the load and
            # MaxVio metrics. megatron's `local_tokens_per_expert` exists only with an expert bias, which V2 lacks.
            # Not persistent: checkpoints stay as they were. int64: exact, and untouched by a bf16/fp16 model cast.
            self.register_buffer("load_counts", torch.zeros(config.num_moe_experts, dtype=torch.int64,
                                                            device=self.weight.device), persistent=False)

        def _reduce_counts(self, x: torch.Tensor) -> torch.Tensor:
            return reduce_from_tensor_model_parallel_region(x, self.tp_cp_group)

        def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
            s = self.settings
            seq_length = logits.shape[0]
            logits = logits.view(-1, self.config.num_moe_experts)
            if padding_mask is not None:
                padding_mask = padding_mask.reshape(-1)
            logits = self.apply_z_loss(logits, padding_mask=padding_mask)
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)                 # s_{i,t}, eq. 11
            routing_map = device_limited_topk(scores.detach(), self.topk, s.num_devices, s.device_limit)
            probs = scores * routing_map                                                 # g_{i,t}, eq. 10
            if self.training and torch.is_grad_enabled():
                # The router's choices BEFORE device-level token dropping: the balance its losses act on. Like
                # megatron's V3 count, grad mode only, so neither eval nor the no-grad first pass of activation
                # recomputation counts a token twice; padding tokens are not counted.
                counted = routing_map if padding_mask is None else routing_map & ~padding_mask[:, None]
                self.load_counts += counted.sum(dim=0)
            if self.config.moe_router_topk_scaling_factor:
                probs = probs * self.config.moe_router_topk_scaling_factor

            if self.training and torch.is_grad_enabled() and any(a > 0 for a in s.aux_loss_coeffs):
                reduce = self._reduce_counts if self.tp_cp_group.size() > 1 else None
                losses = balance_losses(scores, routing_map, seq_length=seq_length, topk=self.topk,
                                        num_devices=s.num_devices, device_limit=s.device_limit,
                                        padding_mask=padding_mask, counts_reduce=reduce)
                for name, alpha, loss in zip(LOSS_NAMES, s.aux_loss_coeffs, losses):
                    if alpha > 0:
                        probs = self.attach_and_log_load_balancing_loss(
                            probs, alpha, alpha * loss, name, self.tp_cp_group,
                            valid_token_count=None if padding_mask is None else (~padding_mask).sum())

            if self.training and s.capacity_factor is not None:                          # §2.2.4: never at eval
                keep = device_token_drop(scores, routing_map, self.topk, s.num_devices, s.capacity_factor)
                probs, routing_map = probs * keep, keep
            return probs.type_as(logits), routing_map

    DeepSeekV2Router.__qualname__ = "DeepSeekV2Router"
    return DeepSeekV2Router


def __getattr__(name: str):
    if name == "DeepSeekV2Router":     # megatron is imported on first use, after the CPU shim had its chance
        cls = _define_router()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
