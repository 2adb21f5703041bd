"""Generation with megatron-core's KV cache against the uncached reference, in one process on the same model and
prompts: the tiny preset's architecture (MLA, MoE, MTP, its 4,096-row vocabulary subset) with random weights,
greedy, 256 new tokens per prompt.

For each batch size B it decodes one batch of B prompts (24, 26, 28, ... tokens) both ways and prints each path's
best wall time over a few rounds (alternating the two), its tokens/s, the speed-up uncached / cached, and whether the
two gave the same tokens. B = 16 is the evaluate stage's default batch size (EvaluateConfig.batch_size).

On CPU the tiny model's decode step is mostly fixed per-step cost (about 950 eager torch calls through megatron's
modules and the CPU shim, ~12 ms on one core), which the cache does not remove; what it removes, recomputing every
earlier position, grows with the batch and the length. So the speed-up grows with the batch size.

    python benchmarks/generate.py [--new-tokens 256] [--batch-sizes 1 8 16 32] [--rounds 2] [--threads 1]

One torch thread by default: on a small machine shared with other jobs, a second OpenMP thread makes small-tensor
timings erratic (a single step can stall for seconds while its threads wait for a core).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "The quick brown fox jumps over the lazy dog, and the dog, being lazy, does not mind at all.\n")


def timed(gen, prompts, new_tokens: int, use_cache: bool) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = gen.generate(prompts, new_tokens, use_cache=use_cache)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from training.config import ParallelConfig
    from training.config.loader import resolve_stage_config
    from training.eval.generate import Generator
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    model = resolve_stage_config("pretrain", args.preset).model
    gpt, _ = build_gpt(model, ParallelConfig(), seed=0)
    gpt.eval()
    gen = Generator(gpt, model.max_position_embeddings, vocab_merges=model.vocab_merges)
    ids = gen.encode(TEXT * 8)
    print(f"{model.name}: {sum(p.numel() for p in gpt.parameters()):,} parameters, {gen.vocabulary.describe()}; "
          f"greedy, {args.new_tokens} new tokens per prompt, best of {args.rounds}, {args.threads} thread(s)")
    print(f"{'batch':>5} {'prompt tokens':>13} {'uncached s':>10} {'tokens/s':>8} {'cached s':>8} {'tokens/s':>8} "
          f"{'speed-up':>8}  same tokens", flush=True)
    gen.generate([ids[:8]], 4)   # warm-up: first-call allocations and caches
    for batch in args.batch_sizes:
        gen.batch_size = batch
        prompts = [ids[i:i + 24 + 2 * i] for i in range(batch)]
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for use_cache in (True, False):
                elapsed, outputs[use_cache] = timed(gen, prompts, args.new_tokens, use_cache)
                best[use_cache] = min(best.get(use_cache, elapsed), elapsed)
        produced = sum(len(t) for t in outputs[True])
        print(f"{batch:>5} {f'{len(prompts[0])}-{len(prompts[-1])}':>13} {best[False]:>10.2f} "
              f"{produced / best[False]:>8.0f} {best[True]:>8.2f} {produced / best[True]:>8.0f} "
              f"{best[False] / best[True]:>7.1f}x  {'yes' if outputs[True] == outputs[False] else 'NO'}"
              f" ({produced} tokens)", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
