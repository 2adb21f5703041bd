"""CPU shim: CUDA RNG state on the CPU generator.

megatron-core seeds, saves and restores the CUDA generator (`torch.cuda.manual_seed`, `get_rng_state`,
`set_rng_state`), and its tensor-parallel RNG tracker (dropout regions, activation recompute) swaps CUDA generator
states through `_get_cuda_rng_state` / `_set_cuda_rng_state`. Without CUDA all of them act on the CPU generator,
which `torch.manual_seed` seeds, so recomputed dropout masks still replay exactly.
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose tensor_parallel.random this was checked against


@once
def apply() -> None:
    """Idempotent. CPU-only machines; imports megatron-core (after `cpu_device` and `cpu_triton`)."""
    import torch

    cuda = torch.cuda
    cuda.manual_seed = lambda seed: None          # the CPU generator is seeded by torch.manual_seed
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    import megatron.core.tensor_parallel.random as tp_random

    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
