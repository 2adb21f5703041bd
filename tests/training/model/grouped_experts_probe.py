"""Probe of tests/training/model/test_grouped_experts.py: `python grouped_experts_probe.py fp32|bf16` builds the micro
model twice from one seed, with megatron's SequentialMLP experts and with GroupedExperts (`parallel.moe_grouped_gemm`),
runs one forward and backward of the same tokens through each, and prints one JSON line: both losses, the largest
difference of any parameter's gradient and its name, the expert classes, and the same comparison for one MoE layer's
experts called directly with chosen token counts (empty experts, and no tokens at all)."""
import json
import sys

import torch


def build(cfg, grouped: bool, bf16: bool):
    from training.model.build import build_gpt

    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"moe_grouped_gemm": grouped})})
    gpt, _ = build_gpt(cfg.model, cfg.parallel, seed=5, bf16=bf16)
    return gpt


def loss_and_grads(gpt, tokens):
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    loss = gpt(ids, positions, None, labels=labels).float().mean()
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in gpt.named_parameters() if p.grad is not None}


def experts_directly(sequential, grouped, dtype):
    """One MoE layer's local experts on hand-chosen groups: 8 experts, 3 of them empty; then no tokens at all."""
    results = []
    for counts in ([3, 0, 5, 1, 0, 7, 0, 2], [0] * 8):
        generator = torch.Generator().manual_seed(sum(counts))
        x = torch.randn(sum(counts), 64, generator=generator).to(dtype)
        probs = torch.rand(sum(counts), generator=generator)
        grad = torch.randn(sum(counts), 64, generator=generator).to(dtype)
        outputs = []
        for module in (sequential, grouped):
            module.zero_grad()
            xi = x.clone().requires_grad_()
            out, bias = module(xi, torch.tensor(counts), probs)
            out.backward(grad)
            outputs.append((out.float(), xi.grad.float(), [p.grad.float() for p in module.parameters()]))
        (o1, g1, w1), (o2, g2, w2) = outputs
        results.append({"tokens": sum(counts), "output": (o1 - o2).abs().max().item() if o1.numel() else 0.0,
                        "input_grad": (g1 - g2).abs().max().item() if g1.numel() else 0.0,
                        "weight_grad": max((a - b).abs().max().item() for a, b in zip(w1, w2)),
                        "grouped_class": type(grouped).__name__})
    return results


def main():
    from training.config import resolve_stage_config
    from training.parallel.setup import init_distributed

    precision = sys.argv[1]
    bf16 = precision == "bf16"
    cfg = resolve_stage_config("pretrain", "micro")
    init_distributed(cfg.parallel, seed=3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    models = [build(cfg, grouped, bf16) for grouped in (False, True)]
    (loss1, grads1), (loss2, grads2) = (loss_and_grads(gpt, tokens) for gpt in models)
    assert grads1.keys() == grads2.keys()
    worst = max(grads1, key=lambda name: (grads1[name] - grads2[name]).abs().max().item())
    layer = "decoder.layers.1.mlp.experts"
    sequential, grouped = (gpt.get_submodule(layer) for gpt in models)
    print(json.dumps({
        "losses": [loss1, loss2], "worst_grad": worst,
        "same_state_dict_keys": models[0].state_dict().keys() == models[1].state_dict().keys(),
        "worst_grad_diff": (grads1[worst] - grads2[worst]).abs().max().item(),
        "grad_scale": max(g.abs().max().item() for g in grads1.values()),
        "expert_classes": sorted({type(m).__name__ for gpt in models for n, m in gpt.named_modules()
                                  if n.endswith("mlp.experts")}),
        "mtp_experts": sorted({type(m).__name__ for n, m in models[1].named_modules() if n.startswith("mtp") and n.endswith("mlp.experts")}),
        "direct": experts_directly(sequential, grouped, torch.bfloat16 if bf16 else torch.float32)}))


if __name__ == "__main__":
    main()
