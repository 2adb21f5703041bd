"""Local-spec gap (every device): the torch RMSNorm under sequence parallelism.

megatron-core's `WrappedTorchNorm` refuses `sequence_parallel`, which only the TE/Apex norms accept. A norm has
nothing to split: under sequence parallelism each tensor-parallel rank normalises its own tokens with the same
weights. So the norm is built as without sequence parallelism and its parameters are marked `sequence_parallel`,
which makes megatron all-reduce their gradients over the tensor-parallel group (each rank saw different tokens).
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose transformer/torch_norm.py this was checked against


@once
def apply() -> None:
    """Idempotent; imports megatron-core (on a CPU, after the CPU shim)."""
    from megatron.core.transformer import torch_norm

    wrapped = torch_norm.WrappedTorchNorm
    original_new = wrapped.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True   # so their grads are all-reduced over the TP group
        return norm

    wrapped.__new__ = staticmethod(__new__)
