"""CPU shim: no torch.compile.

megatron-core's `jit_fuser` and its torch.compile'd fusions (bias + activation, rotary, ...) build C++ through
inductor on a CPU: 5-21 s per cold step (measured in shared/FACTS.md) for kernels a tiny CPU model does not need.
`torch.compile` becomes the identity (as a call or as a decorator factory), so the eager functions run.
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose jit_fuser this was checked against


def _identity_compile(fn=None, *args, **kwargs):
    return fn if callable(fn) else (lambda f: f)


@once
def apply() -> None:
    """Idempotent. CPU-only machines: a GPU keeps its compiled fusions."""
    import torch

    torch.compile = _identity_compile
