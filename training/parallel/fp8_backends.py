"""The GEMM of two FP8 operands, `a · bᵀ` for a [m, k] and b [n, k] quantised along their shared dimension k
(training/model/fp8_quant.py), on the device's backend:

  - **CPU: emulated.** The dequantised operands multiplied in float32: the quantisation numerics of the GPU path,
    only slower, so every numerical test runs on CPU machines.
  - **CUDA: torch's blockwise `scaled_mm`** (`torch.nn.functional.scaled_mm` with `ScalingType.BlockWise1x128` /
    `BlockWise128x128`, CUTLASS/cuBLASLt kernels for Hopper, torch >= 2.10 built with CUDA >= 12.9). The E4M3 values
    go in as quantised here; the kernel applies the per-tile scales while it accumulates in float32.
  - Anything else (an older torch, a CUDA build before 12.9, a GPU that is not Hopper, another device type) raises
    `Fp8Unavailable` naming the reason: never a silent fallback to another precision.

The kernel's layout rules, met by `scaled_mm_operands` (torch's own shape checker runs them on the meta device in
the tests):
  - a is row-major and b column-major ([k, n] with stride (1, k)): the "TN" layout of FP8 tensor-core GEMMs;
  - k is a multiple of 128, n of 128 for 128 x 128 blocks (of 16 for 1 x 128 tiles), and m of 4 (FACTS.md, from
    PyTorch's own fixes): the operands are padded with zeros, which is fp8_quant's edge-tile rule (a
    zero changes no tile's max-abs and adds zero products);
  - 1 x 128 scales are outer-dim-major ([rows, k / 128] with stride (1, rows)); 128 x 128 block scales are given as
    [k-blocks rounded up to 4, n-blocks], outer-dim-major, the padding scales set to 1.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from training.model.fp8_quant import FP8, TILE, Quantized


class Fp8Unavailable(RuntimeError):
    """FP8 training cannot run on this device; the message says why."""


def gemm(a: Quantized, b: Quantized) -> torch.Tensor:
    """float32 a · bᵀ of a [m, k] and b [n, k], each quantised along k."""
    device = a.values.device
    if device.type == "cpu":
        return a.dequantize() @ b.dequantize().t()
    reason = gpu_unavailable_reason(device)
    if reason:
        raise Fp8Unavailable(reason)
    m, n = a.values.shape[0], b.values.shape[0]
    # use_fast_accum off: the kernel promotes its partial sums to full float32 as it goes, V3 §3.3.2's answer to
    # the tensor cores' limited FP8 accumulation precision. bf16 out: what the bf16 run takes from a linear.
    out = F.scaled_mm(**scaled_mm_operands(a, b), output_dtype=torch.bfloat16, use_fast_accum=False)
    return out[:m, :n].float()


@functools.cache
def gpu_unavailable_reason(device: torch.device) -> str | None:
    """Why blockwise FP8 GEMMs cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return (f"FP8 GEMMs on {device.type} are not built: seekflow's FP8 runs as a CPU emulation or on CUDA "
                f"(Hopper) with torch's blockwise scaled_mm")
    if not hasattr(F, "ScalingType") or not hasattr(F.ScalingType, "BlockWise1x128"):
        return (f"torch {torch.__version__} has no blockwise scaled_mm (torch.nn.functional.ScalingType."
                f"BlockWise1x128); FP8 training needs torch >= 2.10")
    cuda = tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return (f"torch {torch.__version__} is built with CUDA {torch.version.cuda}; blockwise FP8 GEMMs need "
                f"CUDA >= 12.9")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): torch's 1 x 128 / "
                f"128 x 128 blockwise FP8 GEMMs run on Hopper (9.0) only")
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _padded(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A row-major [rows, cols] copy of `values` with zeros after it (the tensor itself when it fits and is
    row-major)."""
    if tuple(values.shape) == (rows, cols) and values.is_contiguous():
        return values
    out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    out[:values.shape[0], :values.shape[1]] = values
    return out


def _padded_scales(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A row-major [rows, cols] copy of `scales`, ones after it (a padded tile holds only zeros)."""
    out = torch.ones(rows, cols, dtype=torch.float32, device=scales.device)
    out[:scales.shape[0], :scales.shape[1]] = scales
    return out


def _outer_dim_major(t: torch.Tensor) -> torch.Tensor:
    """The same [rows, cols] values with stride (1, rows)."""
    return t.t().contiguous().t()


def scaled_mm_operands(a: Quantized, b: Quantized) -> dict:
    """The keyword arguments of `F.scaled_mm` computing a · bᵀ (output [m, n] rounded up; see the module docstring
    for the layout rules)."""
    if a.tile != (1, TILE) or b.tile not in ((1, TILE), (TILE, TILE)):
        raise ValueError(f"blockwise scaled_mm takes 1 x {TILE} tiles times 1 x {TILE} tiles or {TILE} x {TILE} "
                         f"blocks; got {a.tile} and {b.tile}")
    if a.values.dtype != FP8 or b.values.dtype != FP8:
        raise ValueError(f"scaled_mm operands must be {FP8}; got {a.values.dtype} and {b.values.dtype}")
    (m, k), n = a.values.shape, b.values.shape[0]
    k_padded = _round_up(k, TILE)
    k_tiles = k_padded // TILE
    blocks = b.tile == (TILE, TILE)
    n_padded = _round_up(n, TILE if blocks else 16)
    m_padded = _round_up(m, 4)
    mat_a = _padded(a.values, m_padded, k_padded)
    mat_b = _padded(b.values, n_padded, k_padded).t()              # [k, n], column-major
    scale_a = _outer_dim_major(_padded_scales(a.scales, m_padded, k_tiles))   # [m, k / 128]
    if blocks:                                                    # [k-blocks rounded up to 4, n / 128]
        scale_b = _padded_scales(b.scales, n_padded // TILE, _round_up(k_tiles, 4)).t()
        recipe_b = F.ScalingType.BlockWise128x128
    else:                                                         # [n, k / 128]
        scale_b = _outer_dim_major(_padded_scales(b.scales, n_padded, k_tiles))
        recipe_b = F.ScalingType.BlockWise1x128
    return dict(mat_a=mat_a, mat_b=mat_b, scale_a=scale_a, scale_recipe_a=F.ScalingType.BlockWise1x128,
                scale_b=scale_b, scale_recipe_b=recipe_b)
