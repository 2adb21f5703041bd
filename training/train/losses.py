"""Losses of a training step: the per-micro-batch losses a stage plugs into the GPT train module, and the step's
logged losses reduced over every rank — each reported loss, and megatron-core's MTP and MoE balance loss trackers
(which megatron itself would reduce with ReduceOp.AVG, which gloo lacks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from training.train.module import Loss


class NextTokenLoss(Loss):
    """Cross-entropy of each next token where `loss_mask` is 1 (pretraining and code CPT: every token; SFT: the
    answer's). GPTModel computes the per-token loss from `labels` (and adds the MTP loss to the graph itself)."""

    reported = ("lm loss",)

    def __call__(self, model, batch: dict, attention_mask=None):
        loss_mask = batch["loss_mask"].float()
        output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                       loss_mask=loss_mask)

        def loss_func(per_token_loss):
            mask = loss_mask.view(-1)
            total = (per_token_loss.float().view(-1) * mask).sum()
            count = mask.sum()
            return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}

        return output, loss_func


class PackedNextTokenLoss(NextTokenLoss):
    """`NextTokenLoss` on packed samples kept apart (SFT): attention within each sample only, and rotary positions
    restarting per sample, both read from the batch's `position_ids` (training/model/packing.py)."""

    def __call__(self, model, batch: dict):
        from training.model.packing import packed_positions, sample_mask

        positions = batch["position_ids"]
        with packed_positions(positions):
            return super().__call__(model, batch, attention_mask=sample_mask(positions))


def global_mean_losses(losses: list[dict], names: tuple[str, ...]) -> dict[str, float]:
    """Token-weighted mean of each reported loss over micro-batches and data-parallel ranks (only last pipeline
    stages have them; the others add zeros), as {"lm_loss": ...}: spaces in the names become underscores."""
    local = torch.zeros(len(names), 2)
    for item in losses or []:
        for i, name in enumerate(names):
            local[i] += item[name].detach().float().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local)
    return {name.replace(" ", "_"): (local[i, 0] / local[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def balance_loss_names(model) -> list[str]:
    """The MoE balance losses megatron-core's tracker will hold for this model config, in a fixed order."""
    if model.num_experts is None:
        return []
    if model.moe_router_type == "deepseek_v2":
        from training.model.routers import LOSS_NAMES

        return [name for name, alpha in zip(LOSS_NAMES, model.moe_aux_loss_coeffs) if alpha > 0]
    return ["seq_load_balancing_loss"] if model.moe_aux_loss_coeff > 0 else []


def auxiliary_losses(model, num_microbatches: int) -> dict:
    """MTP and MoE balance losses from megatron-core's trackers, reduced over every rank, then reset.

    megatron's own reduction (`reduce_aux_losses_tracker_across_ranks`) needs ReduceOp.AVG, which gloo lacks, and
    deadlocks unless every rank holds every tracker name. Here every rank contributes the same fixed-size vector
    (names known from the config; zeros for what it lacks) to one SUM over the world, which combines:
    pipeline stages (disjoint layers), tensor/context-parallel ranks (each holds its sequence shard's share of a
    balance loss, which megatron sums), data-parallel ranks (different data, averaged); the MTP loss is whole on
    every tensor-parallel rank of the last stage, so it is averaged over TP x CP x DP. Then, as megatron's
    track_moe_metrics: a balance loss is its sum over the MoE layers (MTP's included) / their count, and every value
    is divided by the micro-batches of the step."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    names, tracker = balance_loss_names(model), get_moe_layer_wise_logging_tracker()
    unexpected = sorted(set(tracker) - set(names))
    if unexpected:
        raise RuntimeError(f"megatron-core tracked losses {unexpected} that the config does not predict "
                           f"(expected {names}); balance_loss_names must learn them")
    slots = model.num_layers + model.mtp_num_layers   # the tracker's length: one slot per layer, MTP's included
    parts = [tracker[n]["values"].detach().float().cpu() if n in tracker else torch.zeros(slots) for n in names]
    mtp = MTPLossLoggingHelper.tracker.get("values")
    parts.append(mtp.detach().float().cpu() if mtp is not None else torch.zeros(model.mtp_num_layers))
    flat = torch.cat([p.view(-1) for p in parts])
    if flat.numel() and dist.is_initialized() and dist.get_world_size() > 1:   # a dense model without MTP: nothing
        dist.all_reduce(flat)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = parallel_state.get_data_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    out = {}
    moe_layers = model.num_layers - model.first_k_dense_layers + model.mtp_num_layers
    for i, name in enumerate(names):
        out[name] = (flat[i * slots:(i + 1) * slots].sum() / (moe_layers * dp * num_microbatches)).item()
    if model.mtp_num_layers:   # the mean over the D depths, as L_MTP = λ/D Σ_k L_MTP^k (DeepSeek-V3 §2.2, eq. 25)
        out["mtp_loss"] = (flat[len(names) * slots:].sum()
                           / (model.mtp_num_layers * (world // pp) * num_microbatches)).item()
    clear_loss_trackers()
    return out


def clear_loss_trackers() -> None:
    """Empty megatron-core's balance-loss and MTP-loss trackers (read once per step, or after passes that must leave
    no trace)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if MTPLossLoggingHelper.tracker.get("values") is not None:
        MTPLossLoggingHelper.clean_loss_in_tracker()
    clear_aux_losses_tracker()


def fim_middle_span(prefix_len: int, middle_len: int, suffix_len: int) -> tuple[int, int]:
    """Token indices [start, end) of the middle in `training.tokenizer.fim_document_ids(prefix, middle, suffix,
    mode)`, in either mode: PSM (<begin> P <hole> S <end> M <eod>) and SPM (<begin> <hole> S <end> P M <eod>) both
    put the middle after the prefix, the suffix and three sentinels."""
    start = prefix_len + suffix_len + 3
    return start, start + middle_len


def middle_token_nll(token_nll: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[float, int]:
    """(summed NLL, token count) over the middle tokens of FIM documents, one per row: the loss a model pays to fill
    the hole. `token_nll` [batch, seq - 1]: column t is the NLL of token t + 1 given tokens 0..t (next-token labels'
    layout, as `Generator.token_nll` returns it); `spans`: each row's middle [start, end) in token indices."""
    mask = torch.zeros(token_nll.shape, dtype=torch.bool)
    for row, (start, end) in enumerate(spans):
        if start < 1 or end > token_nll.shape[1] + 1:
            raise ValueError(f"row {row}: middle span {start}:{end} outside tokens 1..{token_nll.shape[1]}")
        mask[row, start - 1:end - 1] = True
    return float(token_nll[mask].double().sum()), int(mask.sum())
