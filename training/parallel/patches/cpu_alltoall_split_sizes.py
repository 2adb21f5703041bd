"""CPU shim: the alltoall token dispatcher's split sizes are already in host memory.

megatron-core's alltoall dispatcher copies its split sizes to the host asynchronously on a side CUDA stream
(`maybe_move_tensor_to_cpu(..., record_stream=True)`), then reads them as numpy arrays. On a CPU they are host
tensors already: return them as they are (as numpy when asked).
"""
from __future__ import annotations

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose moe_utils / token_dispatcher this was checked against


def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    import torch

    return tensor.detach().cpu().numpy() if torch.is_tensor(tensor) and as_numpy else tensor


@once
def apply() -> None:
    """Idempotent. CPU-only machines; imports megatron-core (after `cpu_device` and `cpu_triton`)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
