"""A few real megatron-core MoE training steps on CPU: `python mcore_step.py [ep=2]` or under torchrun.

Builds seekflow's tiny DeepSeek-V3-shaped model (MLA, shared + routed experts, sigmoid gating with expert bias,
group-limited routing, MTP) with a small vocabulary, trains 3 steps on a fixed global batch split over data-parallel
ranks, and prints one JSON line per step from rank 0.
"""
import json
import sys

import torch


def main():
    from training.config import resolve_stage_config
    from training.parallel.setup import init_distributed, shutdown

    args = dict(a.split("=") for a in sys.argv[1:])
    cfg = resolve_stage_config("pretrain", "tiny", overrides=[
        "model.vocab_size=512", "model.vocab_merges=null", f"parallel.expert_model_parallel_size={args.get('ep', 1)}",
        f"parallel.moe_token_dispatcher_type={args.get('dispatcher', 'alltoall')}"])
    info = init_distributed(cfg.parallel, seed=7)

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from training.model.build import build_gpt
    from training.parallel import patches

    gpt, tconfig = build_gpt(cfg.model, cfg.parallel)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(use_distributed_optimizer=True), gpt)
    tconfig.finalize_model_grads_func, tconfig.no_sync_func = finalize_model_grads, model.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True), [model])

    global_batch, seq = 4, 32
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = torch.randint(0, 512, (global_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    micro = data.chunk(global_batch)[dp_rank::dp]   # micro-batches of 1 sequence, split over DP ranks

    def forward_step(iterator, m):
        sample = next(iterator)
        tokens, labels = sample[:, :-1], sample[:, 1:]
        out = m(tokens, torch.arange(seq).unsqueeze(0), None, labels=labels, loss_mask=torch.ones_like(tokens))

        def loss_func(per_token):
            total = per_token.float().sum()
            return total, torch.tensor(per_token.numel(), dtype=torch.int), {"lm": torch.stack(
                [total.detach(), torch.tensor(float(per_token.numel()))])}
        return out, loss_func

    for step in range(3):
        model.zero_grad_buffer()
        opt.zero_grad()
        losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro),
                                             model=model, num_microbatches=len(micro), seq_length=seq,
                                             micro_batch_size=1, forward_only=False)
        opt.step()
        total = sum(item["lm"] for item in losses)
        torch.distributed.all_reduce(total)
        bias = [b.expert_bias.abs().sum().item() for b in gpt.modules() if getattr(b, "expert_bias", None) is not None]
        if info.is_main:
            print(json.dumps({"step": step, "loss": (total[0] / total[1]).item(), "world": info.world_size,
                              "shim": "cpu_device" in patches.applied(), "expert_bias_abs_sum": sum(bias)}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
