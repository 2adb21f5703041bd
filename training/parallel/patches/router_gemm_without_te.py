"""Local-spec gap (every device): the MoE router's gating GEMM without Transformer Engine.

megatron-core 0.16's `RouterGatingLinearFunction` (the router logits in `moe_router_dtype`, fp32 here) calls
`te_general_gemm` when it "is not None", but `moe_utils` only binds that name when TE imports: without TE every MoE
forward raises NameError. Binding it to None takes megatron's own torch.mm / addmm path. A TE install keeps its GEMM.
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose transformer/moe/moe_utils.py this was checked against


@once
def apply() -> None:
    """Idempotent; imports megatron-core (on a CPU, after the CPU shim)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
