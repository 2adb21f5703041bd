"""Grouped expert GEMMs (`parallel.moe_grouped_gemm: true`): an MoE layer's local experts in two `torch._grouped_mm`
calls (fc1, then fc2) instead of megatron-core's `SequentialMLP`, a Python loop of two small GEMMs per expert.

megatron-core's own grouped MLPs need Transformer Engine or the `grouped_gemm` package; PyTorch has `_grouped_mm`
(CUDA on Hopper and later, and a CPU kernel in recent releases). `GroupedExperts` is a `SequentialMLP` that computes
differently and owns nothing new: the parameters stay each expert's `linear_fc1`/`linear_fc2` weights, so
checkpoints, initialisation, export and the expert-parallel layout are the sequential experts' own, and a run can
switch between the two. The price is a `torch.stack` of the local experts' weights per forward (on a GPU a copy of
the experts' bytes, small next to their GEMMs; autograd routes the gradients back to each expert's weight).

The tokens arrive permuted by the dispatcher, grouped by local expert (`tokens_per_expert`); the GEMMs are local (the
dispatcher does all of expert parallelism's communication), so expert tensor parallelism is unchanged too: fc1 and
fc2 hold this rank's shards and the dispatcher reduces fc2's partial sums.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


class GroupedGemmUnavailable(RuntimeError):
    """`parallel.moe_grouped_gemm` cannot run here; the message says why."""


def check_grouped_mm(dtype: torch.dtype, device: torch.device, *dims: int) -> None:
    """Refuse, naming the reason, what `torch._grouped_mm` cannot do: no such op in this torch, or rows whose bytes
    are not a multiple of 16 (the kernels' stride rule)."""
    if not hasattr(torch, "_grouped_mm"):
        raise GroupedGemmUnavailable(f"parallel.moe_grouped_gemm: torch {torch.__version__} has no "
                                     f"torch._grouped_mm; use the sequential experts (moe_grouped_gemm: false)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    odd = [d for d in dims if (d * itemsize) % 16]
    if odd:
        raise GroupedGemmUnavailable(f"parallel.moe_grouped_gemm: torch._grouped_mm needs rows of a multiple of 16 "
                                     f"bytes; dimensions {odd} in {dtype} on {device.type} are not (hidden_size and "
                                     f"moe_ffn_hidden_size must be multiples of {16 // itemsize})")


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [tokens, in], grouped by `offsets` (each group's end row), times their group's weight
    [groups, out, in] transposed: [tokens, out]."""
    try:
        return torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets)
    except (RuntimeError, NotImplementedError) as error:
        raise GroupedGemmUnavailable(f"parallel.moe_grouped_gemm: torch._grouped_mm failed for {x.dtype} on "
                                     f"{x.device.type} ({error}); use the sequential experts") from error


class GroupedExperts(SequentialMLP):
    """megatron-core's SequentialMLP, its experts' GEMMs grouped (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        if (config.moe_apply_probs_on_input or config.add_bias_linear or not config.gated_linear_unit
                or config.activation_func_clamp_value is not None or config.glu_linear_offset):
            raise ValueError("parallel.moe_grouped_gemm supports SwiGLU experts without biases, the probabilities "
                             "applied to the output (DeepSeek's experts)")
        fc1 = self.local_experts[0].linear_fc1.weight
        check_grouped_mm(fc1.dtype, fc1.device, *fc1.shape)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])   # [E, 2 x ffn, hidden]
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])   # [E, hidden, ffn]
        offsets = torch.cumsum(tokens_per_expert.to(device=x.device), 0).to(torch.int32)
        gate, linear = torch.chunk(grouped_mm(x, fc1, offsets), 2, dim=-1)
        # SwiGLU, then the routing probability, in MLP.forward's order and dtypes
        intermediate = self.config.activation_func(gate) * linear
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(intermediate.dtype)
        return grouped_mm(intermediate, fc2, offsets), None
