"""Probe of tests/training/rl/test_policy_loss.py: GRPOLoss (training/rl/policy_loss.py) in real GPTTrainModule steps
of the micro preset (4 layers: MLA, MoE with the sequence balance loss and expert bias, MTP) on the 240-merge
vocabulary subset (ids differ from rows), one optimizer step of 8 fixed rollout rows in 4 micro-batches of 2.

    python policy_loss_probe.py single OUT       one process: the synthetic rollout (saved to OUT/samples.pt), then
                                                 per aggregation one step against `grpo_loss` on the whole batch from
                                                 a plain forward (loss, kl, clip fraction, gradient); releases saved
    torchrun --nproc-per-node=2 policy_loss_probe.py layouts OUT
                                                 EP2 then PP2 in one launch (groups destroyed and re-made between),
                                                 one step each on OUT/samples.pt, releases saved; then all of them
                                                 loaded side by side (DP2) and compared with the one-process ones

Prints one JSON line (rank 0). Megatron-core's CPU shim and parallel state are process-global: hence processes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

AGGREGATIONS = {"sequence": {}, "token": {}, "dr_grpo": {"max_tokens": 40}}
EPSILON, BETA = 0.2, 0.04
GROUP, ROWS, SEQ = 4, 8, 32
OVERRIDES = ["model.num_layers=4", "model.vocab_merges=240", f"train.seq_length={SEQ}", "train.micro_batch_size=2",
             f"train.global_batch_size={ROWS}", "train.steps=1", "optimizer.warmup_steps=0", "optimizer.lr=1e-3",
             "optimizer.clip_grad=1e9"]   # no clipping: the step's gradient is the loss's, comparable as it is
LAYOUTS = {"EP2": ["parallel.expert_model_parallel_size=2"],   # tests/support/layouts.py's
           "PP2": ["parallel.pipeline_model_parallel_size=2", "parallel.decoder_first_pipeline_num_layers=3"]}


def config(*overrides: str):
    from training.config import resolve_stage_config

    return resolve_stage_config("pretrain", "micro", overrides=[*OVERRIDES, *overrides])


def rollout(vocabulary):
    """8 rows (2 groups of 4; the second group's advantages all 0) of random tokens in DeepSeek ids: prompts of 3-9
    tokens, responses of 1 to 29 tokens, one cut off at the end, PAD after."""
    from training import tokenizer as T
    from training.rl.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    prompts, responses = [3, 5, 9, 4, 6, 3, 7, 4], [12, 1, 20, 29, 7, 15, 3, 10]
    tokens = vocabulary.to_ids(torch.randint(0, vocabulary.rows, (ROWS, SEQ + 1), generator=g))
    mask = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, p + r:] = T.token_id(T.PAD)
        mask[i, p - 1:p - 1 + r] = True
    assert prompts[3] + responses[3] == SEQ + 1   # row 3 is cut off: covered to its last label
    advantages = torch.tensor([1.2, -0.4, 0.5, -1.3, 0.0, 0.0, 0.0, 0.0])
    return Rollout(tokens=tokens, response_mask=mask, old_logp=torch.zeros(ROWS, SEQ), rewards=torch.zeros(2, GROUP),
                   scores={}, advantages=advantages, group_size=GROUP, prompt_index=[i // GROUP for i in range(ROWS)],
                   prompt_lengths=prompts, completions=[""] * ROWS, stop_reasons=["eod"] * ROWS, stats={})


def whole_batch(module):
    """The dataset's rows as one batch in model rows."""
    data = module.batches.dataset
    batch = {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}
    return module.vocabulary.batch_to_rows(batch)


def plain_logp(gpt, batch, *, mtp_weight: float = 0.0) -> torch.Tensor:
    """-CE of the labels from a plain forward of the GPTModel on the whole batch (train mode, autograd on), with the
    MTP loss at `mtp_weight` in its graph."""
    config, saved = gpt.config, gpt.config.mtp_loss_scaling_factor
    config.mtp_loss_scaling_factor = mtp_weight
    try:
        return -gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                    loss_mask=batch["loss_mask"]).float()
    finally:
        config.mtp_loss_scaling_factor = saved


def forget_side_effects(gpt) -> None:
    """What a plain training-mode forward leaves behind: the routers' token counts (the next step's expert-bias
    update would read them) and megatron's logging trackers."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    for module in gpt.modules():
        if getattr(module, "local_tokens_per_expert", None) is not None:
            module.local_tokens_per_expert.zero_()
    clear_aux_losses_tracker()
    MTPLossLoggingHelper.clean_loss_in_tracker()


def grads(module) -> dict[str, torch.Tensor]:
    return {name: p.main_grad.detach().clone() for name, p in module.chunks[0].named_parameters()}


def reference_gradient(module, batch, loss_of_logp, mtp_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """d/dθ of `loss_of_logp(plain logp)` plus the MoE balance losses of the same forward at weight 1 (megatron's
    sequence balance loss is a mean over the batch's sequences, as the step's mean over micro-batches is), collected
    in the DDP gradient buffers and cleared from them after."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    gpt = module.chunks[0]
    for chunk in module.wrapped:
        chunk.zero_grad_buffer()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    MTPLossAutoScaler.set_loss_scale(torch.ones(1))
    loss_of_logp(plain_logp(gpt, batch, mtp_weight=mtp_weight)).backward()
    out = grads(module)
    for chunk in module.wrapped:
        chunk.zero_grad_buffer()
    forget_side_effects(gpt)
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((value - b[key]).abs().max()) for key, value in a.items())


def build(cfg, info, samples, aggregation: str):
    from training.rl.policy_loss import GRPOLoss
    from training.train.gpt_module import GPTTrainModule

    loss = GRPOLoss(epsilon=EPSILON, beta=BETA, aggregation=aggregation, **AGGREGATIONS[aggregation])
    module = GPTTrainModule(cfg, info.device, dataset=lambda n: samples, loss=loss)
    module.start(0, 0)
    return module


def single(out: Path) -> dict:
    from training.parallel.setup import init_distributed, shutdown
    from training.rl.policy_loss import policy_samples
    from training.vocabulary import vocabulary

    cfg = config()
    info = init_distributed(cfg.parallel, seed=cfg.seed)
    ro = rollout(vocabulary(cfg.model.vocab_merges))
    # old_logp: the initial policy's own log-probs, perturbed (ratios beyond 1 ± ε); ref_logp likewise
    module = build(cfg, info, policy_samples(ro, seq_length=SEQ, global_batch_size=ROWS), "sequence")
    with torch.no_grad():
        logp = plain_logp(module.chunks[0], whole_batch(module))
    forget_side_effects(module.chunks[0])
    g = torch.Generator().manual_seed(1)
    ro.old_logp = torch.where(ro.response_mask, logp + 0.15 * torch.randn(logp.shape, generator=g), 0.0)
    ref = torch.where(ro.response_mask, logp + 0.1 * torch.randn(logp.shape, generator=g), 0.0)
    samples = policy_samples(ro, seq_length=SEQ, global_batch_size=ROWS, ref_logp=ref)
    torch.save(samples.batch, out / "samples.pt")
    # A fresh module per aggregation: the same initial weights (the layout-invariant init from the seed).
    report = {"world": info.world_size, "aggregations": {
        aggregation: one_step(cfg, build(cfg, info, samples, aggregation), aggregation, ref, out)
        for aggregation in AGGREGATIONS}}
    shutdown()
    return report


def one_step(cfg, module, aggregation: str, ref: torch.Tensor, out: Path) -> dict:
    """One step of `module` against grpo_loss on the whole batch: values, and gradients element by element."""
    from training import checkpoint
    from training.rl.grpo_loss import grpo_loss

    batch = whole_batch(module)
    assert torch.equal(batch["ref_logp"], ref)   # the float keys pass the row mapping unchanged

    def whole(logp, rows=slice(None), aggregation=aggregation):
        return grpo_loss(logp[rows], batch["old_logp"][rows], batch["ref_logp"][rows], batch["advantages"][rows, 0],
                         batch["loss_mask"][rows], epsilon=EPSILON, beta=BETA, aggregation=aggregation,
                         **AGGREGATIONS[aggregation])

    def per_micro_batch(logp):   # the control: DAPO's token mean taken per micro-batch, then averaged
        parts = [whole(logp, slice(i, i + 2), "token")[0] for i in range(0, ROWS, 2)]
        return sum(parts) / len(parts)

    with torch.no_grad():
        expected, stats = whole(plain_logp(module.chunks[0], batch))
    forget_side_effects(module.chunks[0])
    gradient = reference_gradient(module, batch, lambda logp: whole(logp)[0])
    with_mtp = reference_gradient(module, batch, lambda logp: whole(logp)[0], mtp_weight=0.3)
    per_micro = reference_gradient(module, batch, per_micro_batch) if aggregation == "token" else None
    metrics = module.train_step()
    step_grads = grads(module)
    checkpoint.save_release(out / f"one-{aggregation}", module.model, cfg.model)
    report = {"loss": metrics["grpo_loss"], "expected": float(expected), "kl": metrics["kl"],
              "expected_kl": float(stats["kl"]), "clip_fraction": metrics["clip_fraction"],
              "expected_clip_fraction": float(stats["clip_fraction"]), "mtp_loss": metrics.get("mtp_loss"),
              "grad_max_abs": max(float(v.abs().max()) for v in gradient.values()),
              "grad_max_diff": max_diff(step_grads, gradient),
              "grad_max_diff_if_mtp_trained": max_diff(step_grads, with_mtp)}
    if per_micro is not None:
        report["grad_max_diff_if_token_mean_per_micro_batch"] = max_diff(step_grads, per_micro)
    return report


def layouts(out: Path) -> dict:
    from megatron.core import parallel_state

    from training import checkpoint
    from training.config import ParallelConfig
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown
    from training.rl.policy_loss import PolicySamples

    samples = PolicySamples(torch.load(out / "samples.pt"))
    report = {"losses": {}, "param_max_diff": {}}
    for layout, overrides in LAYOUTS.items():
        cfg = config(*overrides)
        info = init_distributed(cfg.parallel, seed=cfg.seed)
        for aggregation in AGGREGATIONS:
            module = build(cfg, info, samples, aggregation)
            report["losses"][f"{layout}-{aggregation}"] = module.train_step()["grpo_loss"]
            checkpoint.save_release(out / f"{layout}-{aggregation}", module.model, cfg.model)
        parallel_state.destroy_model_parallel()
    cfg = config()
    info = init_distributed(ParallelConfig(), seed=cfg.seed)   # DP2: every rank holds the whole model
    for aggregation in AGGREGATIONS:
        one, _ = build_gpt(cfg.model, ParallelConfig(), seed=cfg.seed)
        checkpoint.load_weights(out / f"one-{aggregation}", one)
        expected = {k: v for k, v in one.state_dict().items() if isinstance(v, torch.Tensor) and "_extra" not in k}
        for layout in LAYOUTS:
            other, _ = build_gpt(cfg.model, ParallelConfig(), seed=cfg.seed)
            checkpoint.load_weights(out / f"{layout}-{aggregation}", other)
            state = other.state_dict()
            report["param_max_diff"][f"{layout}-{aggregation}"] = max(
                float((state[k].double() - v.double()).abs().max()) for k, v in expected.items())
    report["world"] = info.world_size
    shutdown()
    return report


if __name__ == "__main__":
    import os

    torch.set_num_threads(1)   # tiny matrices: threads only contend on this 2-core host
    result = single(Path(sys.argv[2])) if sys.argv[1] == "single" else layouts(Path(sys.argv[2]))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)
