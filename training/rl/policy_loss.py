"""GRPO's policy update as a `Loss` of the GPT train module: `grpo_loss` per micro-batch, in megatron-core's
forward-step contract, on fixed rollout samples (`policy_samples`).

The gradient. GPTModel is built with megatron's default `calculate_per_token_loss=False` (training/model/build.py),
so the schedule divides each micro-batch's returned sum by its returned count and by the number of micro-batches,
and DDP averages over data-parallel ranks: the step's gradient is that of the mean over micro-batches of
sum / count. Every micro-batch has `micro_batch_size` samples, so returning (Σ_i c_i, samples) makes it exactly the
gradient of the global mean of a per-sample term c_i, and each aggregation of `grpo_loss` is such a mean:
    sequence  c_i = -1/|o_i| Σ_t obj_it            (DeepSeekMath eq. 3)
    dr_grpo   c_i = -1/max_tokens Σ_t obj_it        (Dr. GRPO)
    token     c_i = -1/L̄ Σ_t obj_it,  L̄ = the step's response tokens / its samples, so mean_i c_i = -Σ obj / Σ|o|
              (DAPO eq. 8 over the whole optimizer step, not per micro-batch); L̄ comes with the samples
              (`policy_samples`: the key MEAN_RESPONSE_TOKENS), since no micro-batch sees the whole step.
Megatron's MoE balance losses keep the weight they have in pretraining under this contract (each micro-batch's
loss, a mean over its sequences, scaled by 1/micro-batches), whatever the aggregation.

Reported ([sum, count] for `losses.global_mean_losses`): "grpo loss" (sequence, dr_grpo: [Σ_i c_i, samples];
token: [Σ -obj, response tokens]), so the step's logged value is exactly `grpo_loss` on the whole batch; "kl" (k3
per response token; [0, 0] without ref_logp) and "clip fraction" (per response token, `grpo_loss`'s definition).

MTP. Multi-token prediction is a pretraining objective (DeepSeek-V3 §2.2: it densifies the training signal and is
dropped at inference); the sampled tokens are not a target to imitate, so the update must not add the MTP loss.
GPTModel adds it to the graph at forward time with weight `mtp_loss_scaling_factor` read from the model's config
(as `TokenSchedules` relies on), so the forward runs with that weight at 0 (restored after): the MTP cross-entropy
contributes an exact zero gradient. The MTP module still runs (its layer and a second pass of the output head: a
cost, not an error); its cross-entropy on the response tokens is still logged as `mtp_loss`, and its MoE layer's
balance loss and expert-bias counts still act, as every MoE layer's do.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from training.rl.grpo_loss import Aggregation, grpo_loss
from training.train.module import Loss

MEAN_RESPONSE_TOKENS = "mean_response_tokens"   # per sample: L̄ of the optimizer step it belongs to


class GRPOLoss(Loss):
    """The GRPO policy-update loss of a micro-batch {tokens, labels, loss_mask, position_ids, old_logp, advantages,
    ref_logp?, mean_response_tokens?}, all [b, S] (`policy_samples`); tokens/labels already in model rows (the train
    module's forward_step maps them; the float keys pass unchanged). ref_logp may be absent when beta is 0;
    mean_response_tokens is needed by the "token" aggregation only. See the module docstring for the contract."""

    reported = ("grpo loss", "kl", "clip fraction")

    def __init__(self, *, epsilon: float, beta: float, aggregation: Aggregation | str, max_tokens: int | None = None):
        self.aggregation = Aggregation(aggregation)
        if self.aggregation is Aggregation.DR_GRPO and not (max_tokens and max_tokens > 0):
            raise ValueError("aggregation 'dr_grpo' divides by the generation budget: pass max_tokens > 0")
        if epsilon <= 0 or beta < 0:
            raise ValueError(f"need epsilon > 0 and beta >= 0; got {epsilon} and {beta}")
        self.epsilon, self.beta, self.max_tokens = epsilon, beta, max_tokens

    def __call__(self, model, batch: dict):
        from megatron.core import parallel_state

        if parallel_state.get_context_parallel_world_size() > 1:
            # Each CP rank would hold part of every output: |o_i| needs a CP all-reduce and the returned sum a
            # factor CP. Not written (nor runnable: the non-TE spec refuses CP), so refused rather than wrong.
            raise NotImplementedError("GRPOLoss does not support context parallelism")
        mask = batch["loss_mask"].float()
        # The MTP loss's mask (only what megatron logs as mtp_loss now): a micro-batch without one response token
        # after the first position would make it 0/0, whose gradient is NaN even at weight 0; take every position.
        mtp_mask = mask if bool(mask[:, 1:].any()) else None
        with mtp_loss_off(model):
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=mtp_mask)
        return output, lambda per_token_ce: self.reduce(-per_token_ce.float(), batch)

    def reduce(self, logp: Tensor, batch: dict) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(Σ_i c_i, samples, reported) of a micro-batch from the policy's log-probs `logp` [b, S] of its labels."""
        mask, samples = batch["loss_mask"], logp.shape[0]
        args = (logp, batch["old_logp"], batch.get("ref_logp"), batch["advantages"][:, 0], mask)
        kwargs = {"epsilon": self.epsilon, "beta": self.beta}
        if self.aggregation is Aggregation.TOKEN:
            # dr_grpo with max_tokens 1 is the mean over samples of Σ_t -obj: times the samples, the plain sum.
            mean_sum, stats = grpo_loss(*args, **kwargs, aggregation=Aggregation.DR_GRPO, max_tokens=1)
            total = mean_sum * samples
            if MEAN_RESPONSE_TOKENS not in batch:
                raise KeyError(f"the 'token' aggregation needs the batch key {MEAN_RESPONSE_TOKENS!r} (the optimizer "
                               f"step's response tokens per sample; policy_samples adds it)")
            per_step = batch[MEAN_RESPONSE_TOKENS][:, 0]
            if not bool((per_step == per_step[0]).all()):
                raise ValueError(f"{MEAN_RESPONSE_TOKENS} differs within a micro-batch: its samples must come from "
                                 f"one optimizer step")
            numerator = total / per_step[0].clamp(min=1)
            reported_loss = torch.stack([total.detach(), stats["response_tokens"]])
        else:
            mean, stats = grpo_loss(*args, **kwargs, aggregation=self.aggregation, max_tokens=self.max_tokens)
            numerator = mean * samples
            reported_loss = torch.stack([numerator.detach(), torch.tensor(float(samples), device=logp.device)])
        tokens = stats["response_tokens"]
        kl = stats["kl"] * tokens if "kl" in stats else torch.zeros((), device=logp.device)
        return numerator, torch.tensor(samples, dtype=torch.int, device=logp.device), {
            "grpo loss": reported_loss,
            "kl": torch.stack([kl, tokens if "kl" in stats else torch.zeros_like(tokens)]),
            "clip fraction": torch.stack([stats["clip_fraction"] * tokens, tokens])}


@contextmanager
def mtp_loss_off(model):
    """GPTModel's MTP loss weight (`mtp_loss_scaling_factor`, read at forward time) at 0 for the block, restored
    after; `model` may be wrapped (DDP, Float16Module). Nothing to do for a model without MTP."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    if not getattr(config, "mtp_num_layers", None):
        yield
        return
    weight, config.mtp_loss_scaling_factor = config.mtp_loss_scaling_factor, 0.0
    try:
        yield
    finally:
        config.mtp_loss_scaling_factor = weight


class PolicySamples:
    """Fixed rollout samples as the indexable dataset the GPT train module reads (`dataset=lambda n: samples`): one
    dict of [S] tensors per row, `extra_keys` naming what the micro-batches carry beyond the next-token keys."""

    def __init__(self, batch: dict[str, Tensor]):
        self.batch, self.rows = batch, batch["tokens"].shape[0]
        self.extra_keys = tuple(key for key in batch if key not in ("tokens", "labels", "loss_mask", "position_ids"))

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def policy_samples(rollout, *, seq_length: int, global_batch_size: int,
                   ref_logp: Tensor | None = None) -> PolicySamples:
    """A rollout (training/rl/rollout.py) as training samples: `rollout.to_batches`' keys, plus ref_logp (the frozen
    reference policy's log-probs of the labels, [N, T-1] as old_logp; omit when beta is 0) and mean_response_tokens.

    Each run of `global_batch_size` consecutive rows is one optimizer step (the train module's data order, without a
    batch-size ramp); mean_response_tokens is that step's response tokens / rows. Reading past the end starts over
    (GRPO's several updates on one rollout, DeepSeekMath Algorithm 1), on the same step boundaries."""
    from training.rl.rollout import to_batches

    rows = len(rollout)
    if rows % global_batch_size:
        raise ValueError(f"the rollout's {rows} rows are not a whole number of global batches of {global_batch_size}")
    batch = next(to_batches(rollout, rows, seq_length))
    width = batch["tokens"].shape[1]
    if ref_logp is not None:
        if ref_logp.shape != rollout.old_logp.shape:
            raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)}, old_logp {tuple(rollout.old_logp.shape)}")
        masked = torch.where(rollout.response_mask, ref_logp.float(), 0.0)
        batch["ref_logp"] = torch.nn.functional.pad(masked, (0, width - masked.shape[1]))
    lengths = rollout.response_mask.sum(1).float().view(-1, global_batch_size)
    per_step = lengths.mean(1, keepdim=True).expand(-1, global_batch_size).reshape(rows, 1)
    batch[MEAN_RESPONSE_TOKENS] = per_step.expand(rows, width).contiguous()
    return PolicySamples(batch)
