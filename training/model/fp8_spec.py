"""FP8 in megatron-core's GPTModel (`train.precision: fp8`): the linear layers of attention, the dense MLP, the shared
and routed experts and MTP's layer and projection become FP8 linears (training/model/fp8_linear.py); what
DeepSeek-V3 §3.3 keeps in higher precision stays there: the embedding, the output head, the MoE gating (the router's
own weight), the normalisations and the attention core.

megatron's Column/RowParallelLinear call their GEMM through `_forward_impl` (its own seam for other GEMMs); the FP8
classes override only that, keeping megatron's tensor- and sequence-parallel communication around it:
  - sequence parallel: the input is all-gathered along the sequence first (its gradient reduce-scattered back);
  - tensor parallel without it (a column linear's `allreduce_dgrad`): the input gradient is all-reduced;
  - expert layers (`explicit_expert_comm`): the dispatcher has already placed the tokens, the GEMM is local.
Weights, their gradients and checkpoints stay in the training precision: an FP8 run resumes, exports and evaluates
as any other.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)

from training.model.fp8_linear import fp8_linear


# What the FP8 linears compute (`gemm_mode`): "fp8", or the shadow monitor's "high" (the training precision's GEMM,
# as a bf16 run does) and "measure" (FP8, recording each GEMM's relative error against the high-precision one).
_MODE = "fp8"
_ERRORS: dict[str, float] = {}


@contextlib.contextmanager
def gemm_mode(mode: str):
    """Within the block, every FP8 linear of the process computes as `mode` says; yields {layer: relative
    Frobenius error of its output} (filled in "measure" mode)."""
    global _MODE
    if mode not in ("fp8", "high", "measure"):
        raise ValueError(f"unknown FP8 GEMM mode {mode!r}")
    previous, _MODE = _MODE, mode
    _ERRORS.clear()
    try:
        yield _ERRORS
    finally:
        _MODE = previous


def fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                     grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, *, name: str) -> torch.Tensor:
    """megatron's `linear_with_grad_accumulation_and_async_allreduce` contract, with the GEMMs in FP8."""
    if gradient_accumulation_fusion or grad_output_buffer is not None:
        raise ValueError(f"{name}: FP8 linears do not support gradient_accumulation_fusion or deferred embedding "
                         f"wgrad (megatron options that need fused CUDA kernels)")
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    if _MODE == "high":
        output = torch.nn.functional.linear(input, weight)
    else:
        output = fp8_linear(input, weight, name)
        if _MODE == "measure":
            exact = torch.nn.functional.linear(input.float(), weight.float())
            _ERRORS[name] = float(torch.linalg.norm(output.float() - exact) / torch.linalg.norm(exact).clamp_min(1e-30))
    return output if bias is None else output + bias


class Fp8ColumnParallelLinear(ColumnParallelLinear):
    fp8_name = "column linear"   # set to the module's name when it is retyped (`use_fp8_linears`)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return fp8_forward_impl(input, weight, *args, name=self.fp8_name, **kwargs)


class Fp8RowParallelLinear(RowParallelLinear):
    fp8_name = "row linear"

    def _forward_impl(self, input, weight, *args, **kwargs):
        return fp8_forward_impl(input, weight, *args, name=self.fp8_name, **kwargs)


_FP8 = {ColumnParallelLinear: Fp8ColumnParallelLinear, RowParallelLinear: Fp8RowParallelLinear}
HIGH_PRECISION = ("output_layer",)   # V3 §3.3: the output head stays (the embedding and router are not linears)


def use_fp8_linears(model: torch.nn.Module) -> list[str]:
    """Retype every Column/RowParallelLinear of a built model but the output head as its FP8 subclass (which adds no
    state, only the GEMM), naming each for its error messages; returns their names. Done on the built model, not in
    the spec: megatron's MLA accepts only the exact linear classes it knows for its down projections."""
    names = []
    for name, module in model.named_modules():
        fp8_class = _FP8.get(type(module))
        if fp8_class is not None and name.split(".")[-1] not in HIGH_PRECISION:
            module.__class__ = fp8_class
            module.fp8_name = name
            names.append(name)
    return names
