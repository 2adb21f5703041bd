"""Local-spec gap (every device): selective recompute of the norms without Transformer Engine.

Selective recompute of the RMSNorms (and of the MoE activations) builds `CheckpointWithoutOutput()`, whose default
`fp8=False` megatron-core 0.16 reads as "FP8 on" (`fp8 is not None`) and then calls TE's FP8 state manager: a
NameError without TE. FP8 recipes are strings ("e4m3", "hybrid"); None and False both mean off.
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose tensor_parallel.random.CheckpointWithoutOutput this was checked against


@once
def apply() -> None:
    """Idempotent; imports megatron-core (on a CPU, after the CPU shim)."""
    from megatron.core.tensor_parallel import random as tp_random

    checkpoint = tp_random.CheckpointWithoutOutput
    original_init = checkpoint.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = fp8 not in (None, False)

    checkpoint.__init__ = __init__
