"""Megatron-side helpers for tests/training/export/test_export_hf.py, each run in its own process (the CPU shim patches
process-global state):

    python export_megatron.py logits RELEASE TOKENS.pt OUT.pt    megatron-core forward of a release checkpoint
    torchrun --nproc-per-node 2 export_megatron.py reshard RELEASE OUT_RELEASE
                                                                 load under EP2, save it again as a release there
    python export_megatron.py prune RELEASE OUT_RELEASE         the compress stage's masks applied: structured at
                                                                 50% (heads, neurons), then unstructured at 90%
"""
import sys

import torch


def logits(release: str, tokens_file: str, out_file: str) -> None:
    """Main-model logits, and the MTP modules' logits, for the token batch in `tokens_file` ([b, s] int64)."""
    from training.config import ParallelConfig
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    gpt, _ = load_release(release)
    tokens = torch.load(tokens_file)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    # With MTP, GPTModel.forward needs labels (it computes the MTP loss); the logits are taken from the output layer
    # instead: it runs once per MTP module ([s, b, v]), then once for the main model.
    calls = []
    hook = gpt.output_layer.register_forward_hook(lambda mod, args, out: calls.append(out[0].detach().clone()))
    with torch.no_grad():
        gpt(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
    hook.remove()
    as_bsv = [c.transpose(0, 1).contiguous() for c in calls]
    torch.save({"logits": as_bsv[-1], "mtp_logits": as_bsv[:-1]}, out_file)
    shutdown()


def reshard(release: str, out: str) -> None:
    """Load a release into an expert-parallel layout (EP = world size) and save it from there."""
    from pathlib import Path

    import torch.distributed as dist

    from training import checkpoint
    from training.config import ParallelConfig
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown

    parallel = ParallelConfig(expert_model_parallel_size=int(__import__("os").environ["WORLD_SIZE"]))
    init_distributed(parallel, seed=0)
    gpt, model = load_release(release, parallel)
    experts = len(gpt.decoder.layers[-1].mlp.experts.local_experts)
    assert experts == model.num_experts // parallel.expert_model_parallel_size, experts
    checkpoint.save_release(Path(out), gpt, model)
    if dist.get_rank() == 0:
        print(f"resharded: {experts} local experts per rank", flush=True)
    shutdown()


def prune(release: str, out: str) -> None:
    """A pruned copy of a release, as the compress stage leaves one: its masked weights are zeros."""
    from pathlib import Path

    from training import checkpoint
    from training.config import ParallelConfig
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown
    from training.train import pruning

    init_distributed(ParallelConfig(), seed=0)
    gpt, model = load_release(release)
    params = dict(gpt.named_parameters())
    for structure, sparsity in (("structured", 0.5), ("unstructured", 0.9)):
        pruning.apply_masks(params, pruning.model_masks(params, structure, sparsity, model.num_attention_heads))
    checkpoint.save_release(Path(out), gpt, model)
    print(f"pruned: {pruning.sparsity_of(pruning.prunable(params).values()):.4f} of the decoder's matrices zero",
          flush=True)
    shutdown()


if __name__ == "__main__":   # required: dist_checkpointing's async writer spawns processes
    {"logits": logits, "reshard": reshard, "prune": prune}[sys.argv[1]](*sys.argv[2:])
