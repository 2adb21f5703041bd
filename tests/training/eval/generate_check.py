"""Megatron-side checks of training.eval.generate, run in their own process (the CPU shim patches global state):

    python generate_check.py OUT.json

Builds the tiny model with random weights (real DeepSeek vocabulary, MLA, MoE, MTP) and writes:
  nll_max_diff    |token_nll - GPTModel.forward(labels=...) loss|, max over positions: the evaluation's decoder-only
                  path must score tokens exactly as megatron's own forward does
  batched_equal   batched greedy decoding (through the KV cache, the default) == decoding each prompt alone
  greedy_is_argmax the first generated token == argmax of megatron's full-forward logits at the last position
"""
import json
import sys

import torch


def main(out_file: str) -> None:
    from training.config import ModelConfig, ParallelConfig
    from training.eval.generate import Generator
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=3)
    model = ModelConfig(max_position_embeddings=128, init_method_std=0.2)   # larger init: non-trivial argmaxes
    gpt, _ = build_gpt(model, ParallelConfig())
    gpt.eval()
    gen = Generator(gpt, model.max_position_embeddings, batch_size=4)
    prompts = [gen.encode("def add(a, b):\n    return"), gen.encode("The pass key is"), gen.encode("x = [1, 2")]
    tokens = torch.tensor([prompts[0] + prompts[1]])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    calls = []
    hook = gpt.output_layer.register_forward_hook(lambda mod, args, out: calls.append(out[0].detach().clone()))
    with torch.no_grad():
        loss = gpt(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))   # [b, s] per-token CE
    hook.remove()
    main_logits = calls[-1]                                                        # [s, b, v], main model last
    nll = gen.token_nll(tokens)
    single = [gen.generate([p], max_new_tokens=6)[0].token_ids for p in prompts]
    batched = [g.token_ids for g in gen.generate(prompts, max_new_tokens=6)]
    with torch.no_grad():
        first = torch.tensor([prompts[0]])
        calls.clear()
        hook = gpt.output_layer.register_forward_hook(lambda mod, args, out: calls.append(out[0].detach().clone()))
        gpt(first, torch.arange(first.shape[1]).unsqueeze(0), None, labels=torch.roll(first, -1, dims=1))
        hook.remove()
    report = {
        "nll_max_diff": float((loss[0, :-1].double() - nll[0]).abs().max()),
        "logits_shape": list(main_logits.shape),
        "batched_equal": single == batched,
        "generated": batched,
        "greedy_is_argmax": int(calls[-1][-1, 0].argmax()) == single[0][0],
    }
    with open(out_file, "w") as f:
        json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
