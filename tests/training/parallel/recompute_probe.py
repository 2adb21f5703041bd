"""Selective activation recompute on the tiny model, one process: what the forward pass keeps for backward, and
the gradients. `python recompute_probe.py` prints one JSON line per `parallel.recompute` setting.

Memory kept for backward is measured directly: every tensor autograd saves is held until the forward ends, then the
bytes of the distinct storages still allocated are summed (megatron's CheckpointWithoutOutput frees the outputs it
will recompute, so those count as 0).
"""
import json

import torch

SETTINGS = {"none": [], "v3": ["layernorm", "mla_up_proj"],   # DeepSeek-V3 §3.2.3
            "all": ["core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]}


def kept_bytes(saved: list[torch.Tensor]) -> int:
    storages = {}
    for tensor in saved:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main():
    from training.config import resolve_stage_config
    from training.parallel.setup import init_distributed, shutdown

    cfg = resolve_stage_config("pretrain", "tiny", overrides=["model.vocab_size=512", "model.vocab_merges=null"])
    init_distributed(cfg.parallel, seed=7)
    from training.model.build import build_gpt

    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(32).unsqueeze(0)
    baseline = None
    for name, modules in SETTINGS.items():
        gpt, _ = build_gpt(cfg.model, cfg.parallel.model_copy(update={"recompute": modules}), seed=11)
        gpt.train()
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = gpt(inputs, positions, None, labels=labels, loss_mask=torch.ones_like(inputs)).float().mean()
        held = kept_bytes(saved)
        saved.clear()
        loss.backward()
        grads = torch.cat([p.grad.view(-1) for p in gpt.parameters() if p.grad is not None])
        if baseline is None:
            baseline = (loss.detach(), grads)
        print(json.dumps({"setting": name, "kept_bytes": held, "loss": loss.item(),
                          "loss_diff": (loss.detach() - baseline[0]).abs().item(),
                          "grad_max_diff": (grads - baseline[1]).abs().max().item(),
                          "grad_count": grads.numel()}), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
