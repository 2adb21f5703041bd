"""DeepSeek-V3's fine-grained FP8 quantisation (V3 §3.3.2): E4M3 values with one float32 scale per tile.

  - activations (and activation gradients): one scale per 1 x 128 tile, i.e. per token and per 128 channels;
  - weights: one scale per 128 x 128 block (128 output channels x 128 input channels).

Each tile is scaled online by its own max-abs: scale = amax / 448 (E4M3's largest finite value), so the tile's largest
value maps to ±448 and an outlier only coarsens its own tile, not the tensor. A value is stored as
`float8_e4m3fn(x / scale)` and read back as `value * scale`.

Rules every backend follows (the CPU emulation here is the definition the GPU path is checked against):
  - **Edge tiles.** A dimension that is not a multiple of the tile (the tiny profile's hidden 64) ends in a *partial*
    tile whose scale is the max-abs of the elements it has. (A kernel that needs whole tiles pads with zeros, which
    changes no max-abs and adds only zero products: the same numbers.)
  - **All-zero tiles** get scale 1 and store zeros: nothing to divide by 0.
  - **Saturation.** Values are clamped to ±448 before the cast; with online scaling only rounding can push a value
    past it, but the cast must never turn an out-of-range value into NaN (CUDA's does; the CPU's saturates).
  - **inf and NaN** in the input raise `NonFiniteError`, naming the tensor and counting them: a scale computed from
    inf would silently zero the tile, a NaN would spread through the GEMM. On a GPU the check is deferred to once a
    step, before the optimizer step (`defer_finite_checks`): one host sync instead of one per tensor.

E4M3 keeps 3 mantissa bits: a normal value (|x / scale| ≥ 2^-6) is within a relative 2^-4 of x after the round trip;
a subnormal within an absolute 2^-10 · scale (`round_trip_bound`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0                     # torch.finfo(float8_e4m3fn).max
E4M3_RELATIVE_ERROR = 2.0 ** -4      # half an ulp of a 3-bit mantissa, relative, for normal values
E4M3_SUBNORMAL_ERROR = 2.0 ** -10    # half the subnormal spacing (2^-9), in units of the scale
TILE = 128                           # V3 §3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks


class NonFiniteError(FloatingPointError):
    """inf or NaN reached an FP8 quantiser: the step is wrong, and quantising would hide it."""


@dataclass(frozen=True)
class Quantized:
    """`values` (float8_e4m3fn, the original shape [rows, cols]) and `scales` (float32, one per tile:
    [ceil(rows / tile_rows), ceil(cols / tile_cols)]); `tile` = (tile_rows, tile_cols)."""

    values: torch.Tensor
    scales: torch.Tensor
    tile: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: each value times its tile's scale."""
        return self.values.float() * expand(self.scales, self.tile, self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()


def expand(scales: torch.Tensor, tile: tuple[int, int], shape) -> torch.Tensor:
    """Per-tile `scales` broadcast to every element of a [rows, cols] tensor (edge tiles cut to size)."""
    rows, cols = shape
    return scales.repeat_interleave(tile[0], 0)[:rows].repeat_interleave(tile[1], 1)[:, :cols]


def tile_amax(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Max-abs of each tile of a [rows, cols] tensor (partial tiles at the edges: zero-padded, which adds no max)."""
    rows, cols = x.shape
    tr, tc = tile
    padded = torch.nn.functional.pad(x.abs().float(), (0, -cols % tc, 0, -rows % tr))
    return padded.view(padded.shape[0] // tr, tr, padded.shape[1] // tc, tc).amax(dim=(1, 3))


def quantize(x: torch.Tensor, tile: tuple[int, int], name: str = "tensor") -> Quantized:
    """`x` [rows, cols] as E4M3 with one online scale (max-abs / 448) per tile; see the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"{name}: quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    amax = tile_amax(x, tile)   # inf and NaN reach the tile maxima (max-reductions propagate them)
    if _DEFERRED is not None:   # on a GPU: a device-side flag, checked once per step (`check_deferred`)
        _DEFERRED.append((name, ~torch.isfinite(amax).all()))
    else:
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            nan = int(torch.isnan(x).sum())
            raise NonFiniteError(f"{name}: {x.numel() - int(finite.sum())} non-finite value(s) ({nan} NaN, the rest "
                                 f"inf) in a tensor of shape {tuple(x.shape)}; FP8 quantisation refuses them")
    scales = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return Quantized(to_e4m3(x.float() / expand(scales, tile, x.shape)), scales, tile)


# Non-finite checks deferred to once a step (`defer_finite_checks`): (tensor name, device-side "has inf/NaN" flag).
_DEFERRED: list[tuple[str, torch.Tensor]] | None = None


def defer_finite_checks(enabled: bool) -> None:
    """On a GPU, checking every quantised tensor for inf/NaN would stall the device on each one (a host sync per
    tensor, ~5 per linear per step). Deferred, each check leaves a flag on the device and `check_deferred` reads
    them all at once: the train module calls it before the optimizer step, so a bad step is still refused, and the
    error still names the first tensor that held a non-finite value."""
    global _DEFERRED
    _DEFERRED = [] if enabled else None


def check_deferred() -> None:
    """Raise NonFiniteError naming the first tensor quantised since the last check that held inf or NaN."""
    if not _DEFERRED:
        return
    names, flags = zip(*_DEFERRED)
    _DEFERRED.clear()
    bad = torch.stack([f.to(flags[0].device) for f in flags]).cpu()   # the one host sync
    if bool(bad.any()):
        first = names[int(bad.int().argmax())]
        raise NonFiniteError(f"{first}: non-finite value(s) (inf or NaN) in the tensor; FP8 quantisation refuses "
                             f"them ({int(bad.sum())} of the {len(names)} tensors quantised this step had some)")


def to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Already-scaled values as float8_e4m3fn, saturating at ±448 (never NaN for a finite value)."""
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def activation_tiles(x: torch.Tensor, name: str = "activation") -> Quantized:
    """1 x 128 tiles along the last dimension of [tokens, channels] (V3 §3.3.2)."""
    return quantize(x, (1, TILE), name)


def weight_blocks(w: torch.Tensor, name: str = "weight") -> Quantized:
    """128 x 128 blocks of [out, in] (V3 §3.3.2)."""
    return quantize(w, (TILE, TILE), name)


def round_trip_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| E4M3 rounding allows, per element: 2^-4 relative for a normal
    value, 2^-10 of its tile's scale for a subnormal one (whichever is larger)."""
    scale = expand(q.scales, q.tile, x.shape)
    return torch.maximum(x.abs().float() * E4M3_RELATIVE_ERROR, scale * E4M3_SUBNORMAL_ERROR)
