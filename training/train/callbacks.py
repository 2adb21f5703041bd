"""Callbacks of the GPT train module's MoE training: the token schedules of γ and λ, and the expert-load metrics.

Both read megatron-core state the GPT train module exposes (`tconfigs`: one TransformerConfig per model chunk;
`chunks`; `grad_finalize_hooks`), so they go with `GPTTrainModule`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training.train import schedules
from training.train.trainer import Callback


class TokenSchedules(Callback):
    """γ (the expert-bias update speed) and λ (the MTP loss weight) switched by the tokens consumed (DeepSeek-V3 §4.2:
    γ = 0.001 for the first 14.3T tokens then 0; λ = 0.3 for the first 10T then 0.1).

    megatron-core reads both from the TransformerConfig at use time: `moe_router_bias_update_rate` in
    finalize_model_grads' expert-bias update, `mtp_loss_scaling_factor` in GPTModel's MTP loss, so a value set before
    a step takes effect in that step."""

    def __init__(self, model, seq_length: int):
        self.model, self.seq_length = model, seq_length

    def pre_step(self, trainer) -> None:
        m = self.model
        tokens = trainer.module.consumed_samples * self.seq_length
        for tconfig in trainer.module.tconfigs:   # one per model chunk
            if tconfig.moe_router_enable_expert_bias:
                tconfig.moe_router_bias_update_rate = schedules.switch_at(
                    tokens, m.moe_router_bias_update_rate, 0.0, m.moe_router_bias_update_until_tokens)
            if m.mtp_num_layers:
                tconfig.mtp_loss_scaling_factor = schedules.switch_at(
                    tokens, m.mtp_loss_scaling_factor, m.mtp_loss_scaling_factor_after,
                    m.mtp_loss_scaling_switch_tokens)

    def log_metrics(self, trainer) -> dict[str, float]:
        tconfig, out = trainer.module.tconfigs[0], {}
        if tconfig.moe_router_enable_expert_bias:
            out["moe/bias_update_rate"] = float(tconfig.moe_router_bias_update_rate)
        if self.model.mtp_num_layers:
            out["mtp_loss_weight"] = float(tconfig.mtp_loss_scaling_factor)
        return out


class ExpertLoad(Callback):
    """Per log window: MaxVio and tokens per expert of every MoE layer, and the routers' expert-bias norms
    (training/metrics.py); at the end, the whole run's layers x experts heatmap as the MLflow artifact
    `moe/expert_load_heatmap.png` (also written to `heatmap`)."""

    def __init__(self, heatmap: Path):
        self.heatmap, self.tracker = heatmap, None

    def pre_train(self, trainer) -> None:
        from training.metrics import ExpertLoadTracker

        self.tracker = ExpertLoadTracker(torch.nn.ModuleList(trainer.module.chunks))
        # the routers' token counts, read before finalize_model_grads zeroes them
        trainer.module.grad_finalize_hooks.append(self.tracker.snapshot)

    def log_metrics(self, trainer) -> dict[str, float]:
        from training.metrics import load_metrics

        collected = self.tracker.collect()   # a collective: every rank takes part
        return load_metrics(*collected) if collected else {}

    def post_train(self, trainer) -> None:
        if trainer.is_main and trainer.mlflow_run and self.tracker.total is not None:
            import mlflow

            from training.metrics import expert_load_heatmap

            expert_load_heatmap(self.tracker.total, self.tracker.labels, self.heatmap)
            mlflow.log_artifact(str(self.heatmap), artifact_path="moe")
