"""Probe of tests/training/model/test_fp8_training.py: the micro preset built with `fp8=True`; prints one JSON line,
{class name: [module names]}, for the linear layers, the embedding and the routers."""
import json


def main():
    from training.config import resolve_stage_config
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed

    cfg = resolve_stage_config("pretrain", "micro")
    init_distributed(cfg.parallel, seed=3)
    gpt, _ = build_gpt(cfg.model, cfg.parallel, seed=3, fp8=True)
    kinds = {}
    for name, module in gpt.named_modules():
        kind = type(module).__name__
        if kind.endswith(("ParallelLinear", "Embedding", "Router")):
            kinds.setdefault(kind, []).append(name)
    print(json.dumps(kinds))


if __name__ == "__main__":
    main()
