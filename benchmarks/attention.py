"""Core attention: seekflow's `CausalSdpaAttention` against megatron-core's local `DotProductAttention`, which it
replaces in every layer, in one process on the same tensors (MLA head sizes: keys 192, values 128, as DeepSeek-V2/V3).

For each sequence length it prints what each keeps for backward (bytes of the distinct storages autograd holds at the
end of the forward, inputs included) and the best forward + backward time of a few rounds, alternating the two, with
the ratios SDPA / megatron.

    python benchmarks/attention.py [--seq 512 1024 2048] [--heads 16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QK_DIM, V_DIM = 192, 128   # DeepSeek-V2/V3 MLA: d_h + d_h^R for queries and keys, d_h for values


def kept_bytes(attention, q, k, v) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attention(q, k, v, None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved + [out]}
    del out
    return sum(storages.values())


def step_time(attention, q, k, v, upstream) -> float:
    start = time.perf_counter()
    attention(q, k, v, None).backward(upstream)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from training.config import ParallelConfig
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from training.model.attention import CausalSdpaAttention

    config = TransformerConfig(num_layers=1, hidden_size=args.heads * QK_DIM, num_attention_heads=args.heads,
                               attention_dropout=0.0)
    scale = QK_DIM ** -0.5
    implementations = {
        "megatron": DotProductAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=scale,
                                        k_channels=QK_DIM, v_channels=V_DIM),
        "sdpa": CausalSdpaAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=scale),
    }
    print(f"heads {args.heads}, batch 1, fp32, {torch.get_num_threads()} threads; best of {args.rounds} rounds")
    print(f"{'seq':>6} {'kept MB megatron':>17} {'kept MB sdpa':>13} {'ratio':>6}   "
          f"{'ms megatron':>12} {'ms sdpa':>8} {'ratio':>6}")
    for seq in args.seq:
        generator = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(seq, 1, args.heads, d, generator=generator, requires_grad=True)
                   for d in (QK_DIM, QK_DIM, V_DIM))
        upstream = torch.randn(seq, 1, args.heads * V_DIM, generator=generator)
        kept = {name: kept_bytes(attention, q, k, v) for name, attention in implementations.items()}
        times = {name: [] for name in implementations}
        for round_ in range(args.rounds):   # alternate, so drift favours neither
            order = list(implementations) if round_ % 2 == 0 else list(reversed(implementations))
            for name in order:
                times[name].append(step_time(implementations[name], q, k, v, upstream))
        best = {name: min(values) for name, values in times.items()}
        print(f"{seq:>6} {kept['megatron'] / 2**20:>17.1f} {kept['sdpa'] / 2**20:>13.1f} "
              f"{kept['sdpa'] / kept['megatron']:>6.3f}   {best['megatron'] * 1e3:>12.1f} {best['sdpa'] * 1e3:>8.1f} "
              f"{best['sdpa'] / best['megatron']:>6.3f}")
    shutdown()


if __name__ == "__main__":
    main()
