"""DeepSeek-V3's FP8 linear (V3 §3.3, Figure 6): the three GEMMs of a linear layer with both operands in E4M3 and
FP32 accumulation, the input cached for backward in FP8.

  Fprop  Y  = X · Wᵀ     X in 1 x 128 tiles (per token, 128 input channels), W in 128 x 128 blocks
  Dgrad  dX = dY · W     dY in 1 x 128 tiles (per token, 128 output channels), W's blocks transposed (square blocks:
                          the same quantised weight, no second quantisation)
  Wgrad  dW = dYᵀ · X    both along tokens, in 128 x 1 tiles: the cached FP8 input is dequantised, transposed and
                          quantised again, as V3 describes its own workflow (§3.5.2)

What autograd keeps for backward is the FP8 input and the FP8 weight with their scales (~1 byte an element, against
2 for a BF16 linear's input and weight). Master weights and the weight gradient stay in the training precision.

Each GEMM runs on the device's backend (training/parallel/fp8_backends.py): emulated in float32 on a CPU, torch's
blockwise scaled_mm on a Hopper GPU, and otherwise an `Fp8Unavailable` error naming the reason.
"""
from __future__ import annotations

import torch

from training.parallel.fp8_backends import gemm
from training.model.fp8_quant import TILE, Quantized, activation_tiles, quantize, weight_blocks


def transposed(q: Quantized) -> Quantized:
    """The quantised transpose of a tensor quantised in square blocks (its blocks, and their scales, transposed)."""
    if q.tile[0] != q.tile[1]:
        raise ValueError(f"only square blocks transpose without requantising; got tiles {q.tile}")
    return Quantized(q.values.t(), q.scales.t(), q.tile)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, name: str):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        qx = activation_tiles(x2, f"{name}: fprop input")
        qw = weight_blocks(weight, f"{name}: weight")
        ctx.save_for_backward(qx.values, qx.scales, qw.values, qw.scales)
        ctx.name, ctx.dtypes = name, (x.dtype, weight.dtype)
        return gemm(qx, qw).to(x.dtype).reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x_values, x_scales, w_values, w_scales = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        shape = grad_output.shape
        dy = grad_output.reshape(-1, shape[-1])
        qw = Quantized(w_values, w_scales, (TILE, TILE))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:   # Dgrad: dY [m, n] . W [n, k], contracting n
            dgrad = gemm(activation_tiles(dy, f"{ctx.name}: dgrad output gradient"), transposed(qw))
            grad_x = dgrad.to(x_dtype).reshape(*shape[:-1], w_values.shape[1])
        if ctx.needs_input_grad[1]:   # Wgrad: dYᵀ [n, m] . X [m, k], contracting the tokens m
            x = Quantized(x_values, x_scales, (1, TILE)).dequantize()
            dy_t = quantize(dy.t().float(), (1, TILE), f"{ctx.name}: wgrad output gradient")
            x_t = quantize(x.t(), (1, TILE), f"{ctx.name}: wgrad input")
            grad_w = gemm(dy_t, x_t).to(w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, name: str = "linear") -> torch.Tensor:
    """x [..., in] · weight [out, in]ᵀ with V3's FP8 recipe (no bias: megatron's linears add theirs after the GEMM).
    `name` says which layer an error (a non-finite value) came from."""
    return _Fp8Linear.apply(x, weight, name)
