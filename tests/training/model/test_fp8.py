"""DeepSeek-V3's blockwise FP8 (training/model/fp8_quant.py, fp8_linear.py) in the CPU emulation: tile and block
shapes, scales, zero tiles, saturation, non-finite input, the E4M3 round-trip bound, the three GEMMs against float64
within the bound E4M3 rounding of both operands implies, and what autograd keeps for backward against a BF16 linear."""
from __future__ import annotations

import re

import pytest
import torch

from training.parallel.fp8_backends import Fp8Unavailable, gemm
from training.model.fp8_linear import fp8_linear
from training.model.fp8_quant import (E4M3_MAX, FP8, NonFiniteError, Quantized, activation_tiles, quantize,
                                      round_trip_bound, to_e4m3, weight_blocks)


def _random(*shape, seed=0, outliers=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers:   # a few values 1,000x the rest, as activations of LLMs have (V3 §3.3.2's reason for small tiles)
        flat = x.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:max(1, flat.numel() // 500)]] *= 1000
    return x


def test_tiles_and_blocks_have_one_scale_each_and_partial_edges():
    x = _random(3, 300)
    q = activation_tiles(x)
    assert q.values.dtype == FP8 and q.values.shape == (3, 300)
    assert q.scales.shape == (3, 3) and q.tile == (1, 128)   # 128 + 128 + a partial 44
    w = weight_blocks(_random(200, 300, seed=1))
    assert w.scales.shape == (2, 3) and w.tile == (128, 128)  # partial blocks on both edges
    for row in range(3):   # scale = amax / 448, per tile, the partial one over its own 44 elements
        for block, cols in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
            assert q.scales[row, block] == x[row, cols].abs().max() / E4M3_MAX
    w_full = _random(200, 300, seed=1)
    assert w.scales[1, 2] == w_full[128:, 256:].abs().max() / E4M3_MAX
    assert q.values.float().abs().amax() == E4M3_MAX   # each tile's largest value lands on ±448


def test_an_all_zero_tile_has_scale_1_and_reads_back_zeros():
    x = _random(2, 256)
    x[1, 128:] = 0
    q = activation_tiles(x)
    assert q.scales[1, 1] == 1.0 and torch.all(q.dequantize()[1, 128:] == 0)
    assert torch.isfinite(q.scales).all() and torch.isfinite(q.dequantize()).all()


def test_values_beyond_e4m3_saturate_instead_of_becoming_nan():
    assert to_e4m3(torch.tensor([500.0, -1e6, 448.0, 447.0])).float().tolist() == [448.0, -448.0, 448.0, 448.0]


@pytest.mark.parametrize("bad, count", [(float("inf"), "2 non-finite value(s) (0 NaN"),
                                        (float("nan"), "2 non-finite value(s) (2 NaN")])
def test_inf_and_nan_are_refused_naming_the_tensor(bad, count):
    x = _random(4, 128)
    x[0, 3] = x[2, 100] = bad
    with pytest.raises(NonFiniteError, match=rf"layer 3 input: {re.escape(count)}.*shape \(4, 128\)"):
        quantize(x, (1, 128), "layer 3 input")
    with pytest.raises(NonFiniteError, match="proj: fprop input"):
        fp8_linear(x, _random(8, 128), name="proj")


@pytest.mark.parametrize("outliers", [False, True])
def test_the_round_trip_is_within_e4m3s_bound_per_element(outliers):
    x = _random(64, 320, outliers=outliers)
    for q in (activation_tiles(x), weight_blocks(x)):
        error = (q.dequantize() - x).abs()
        assert torch.all(error <= round_trip_bound(x, q)), (error - round_trip_bound(x, q)).max()
        assert error.max() > 0   # quantised, not passed through


def _bound(a: torch.Tensor, a_bound: torch.Tensor, b: torch.Tensor, b_bound: torch.Tensor) -> torch.Tensor:
    """|a·bᵀ - â·b̂ᵀ| allowed by per-element operand errors (|â - a| ≤ a_bound, |b̂ - b| ≤ b_bound), plus
    float32 accumulation (k terms, each 2^-23 relative) on the product of magnitudes."""
    a64, b64, ea, eb = (t.double() for t in (a.abs(), b.abs(), a_bound, b_bound))
    k = a.shape[1]
    return a64 @ eb.t() + ea @ b64.t() + ea @ eb.t() + k * 2.0 ** -23 * ((a64 + ea) @ (b64 + eb).t())


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("shape", [(96, 256, 384), (5, 64, 96)])   # tokens, in, out; the second: tiny's hidden 64
def test_fprop_dgrad_and_wgrad_match_float64_within_the_e4m3_bound(shape, outliers):
    tokens, fan_in, fan_out = shape
    x = _random(tokens, fan_in, seed=1, outliers=outliers).requires_grad_()
    w = (_random(fan_out, fan_in, seed=2) * fan_in ** -0.5).requires_grad_()
    dy = _random(tokens, fan_out, seed=3, outliers=outliers)
    y = fp8_linear(x, w, name="probe")
    y.backward(dy)
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()

    qx, qw, qdy = activation_tiles(x.detach()), weight_blocks(w.detach()), activation_tiles(dy)
    bx, bw, bdy = round_trip_bound(x.detach(), qx), round_trip_bound(w.detach(), qw), round_trip_bound(dy, qdy)
    checks = {"fprop": (y.detach(), x64 @ w64.t(), _bound(x.detach(), bx, w.detach(), bw)),
              "dgrad": (x.grad, dy64 @ w64, _bound(dy, bdy, w.detach().t(), bw.t()))}
    # Wgrad: the cached input is dequantised and quantised again along the tokens (128 x 1 tiles), as is dY
    cached_t = qx.dequantize().t()
    input_error = bx.t() + round_trip_bound(cached_t, quantize(cached_t, (1, 128)))
    dy_error = round_trip_bound(dy.t(), quantize(dy.t(), (1, 128)))
    checks["wgrad"] = (w.grad, dy64.t() @ x64, _bound(dy.t(), dy_error, x.detach().t(), input_error))
    for name, (got, exact, bound) in checks.items():
        error = (got.double() - exact).abs()
        assert torch.all(error <= bound), (name, float((error - bound).max()))
        assert error.max() > 0, name   # FP8, not float32 passed through


def test_fp8_keeps_at_most_55_percent_of_what_a_bf16_linear_keeps_for_backward():
    """What autograd holds at the end of the forward (distinct storages, as tests/training/parallel/
    recompute_probe.py measures it): the BF16 linear's input and weight, against the FP8 input and weight with
    their scales."""
    def kept(function, x, w) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            function(x, w)
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}.values())

    x = _random(512, 1024).bfloat16().requires_grad_()
    w = _random(2048, 1024, seed=1).bfloat16().requires_grad_()
    bf16 = kept(torch.nn.functional.linear, x, w)
    fp8 = kept(lambda a, b: fp8_linear(a, b), x, w)
    assert bf16 == 2 * (512 * 1024 + 2048 * 1024)
    assert fp8 <= 0.55 * bf16, fp8 / bf16
    print(f"kept for backward: bf16 {bf16} bytes, fp8 {fp8} bytes ({fp8 / bf16:.1%})")


def test_a_device_without_the_fp8_backend_fails_naming_why():
    meta = torch.empty(4, 128, device="meta", dtype=FP8)
    operand = Quantized(meta, torch.empty(4, 1, device="meta"), (1, 128))
    with pytest.raises(Fp8Unavailable, match="FP8 GEMMs on meta are not built: seekflow's FP8 runs as a CPU emulation or on CUDA"):
        gemm(operand, operand)


@pytest.mark.parametrize("gemm_name, m, n, k", [
    ("fprop, tiny", 7, 192, 64),          # hidden 64: k and n padded to 128
    ("fprop, V3 expert", 300, 2048, 7168),
    ("dgrad, tiny", 7, 64, 192),          # the weight's blocks transposed (a non-contiguous view)
    ("wgrad, tiny", 192, 64, 7),          # 1 x 128 times 1 x 128, contracting 7 tokens
])
def test_the_gpu_backends_operands_pass_torchs_own_scaled_mm_checks(gemm_name, m, n, k):
    """The blockwise scaled_mm's layout rules (row/column-major, multiples of 16 and 128, outer-dim-major scales,
    block scales rounded to 4) as torch's meta kernel checks them; the kernel itself needs a Hopper GPU
    (tests/training/model/test_fp8_gpu.py)."""
    from training.parallel.fp8_backends import scaled_mm_operands
    from training.model.fp8_linear import transposed

    a = activation_tiles(_random(m, k))
    if gemm_name.startswith("fprop"):
        b = weight_blocks(_random(n, k, seed=1))
    elif gemm_name.startswith("dgrad"):
        b = transposed(weight_blocks(_random(k, n, seed=1)))
    else:
        b = activation_tiles(_random(n, k, seed=1))
    assert b.values.shape == (n, k)
    on_meta = {key: value.to("meta") if isinstance(value, torch.Tensor) else value
               for key, value in scaled_mm_operands(a, b).items()}
    out = torch.nn.functional.scaled_mm(**on_meta, output_dtype=torch.bfloat16)
    assert m <= out.shape[0] < m + 4 and n <= out.shape[1] < n + 128
    # the padding is zeros with unit scales: the padded GEMM, emulated, is the unpadded one
    operands = scaled_mm_operands(a, b)
    b_padded = Quantized(operands["mat_b"].t(), operands["scale_b"].t()[:, :-(-operands["mat_b"].shape[0] // 128)]
                         if b.tile == (128, 128) else operands["scale_b"], b.tile)
    a_padded = Quantized(operands["mat_a"], operands["scale_a"], a.tile)
    exact = gemm(a, b)   # (float32 sums in another order: equal up to rounding)
    assert torch.allclose(gemm(a_padded, b_padded)[:m, :n], exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


def test_deferred_finite_checks_flag_on_the_device_and_raise_once_a_step_naming_the_tensor():
    """A GPU run defers the inf/NaN check to one host sync a step (fp8_quant.defer_finite_checks); run here on CPU
    tensors, the same code path: nothing raises while quantising, the step's check names the first bad tensor."""
    from training.model import fp8_quant

    fp8_quant.defer_finite_checks(True)
    try:
        activation_tiles(_random(4, 300), "layer 1: fprop input")
        bad = _random(4, 300)
        bad[2, 200] = float("nan")
        activation_tiles(bad, "layer 2: fprop input")   # no raise yet
        worse = _random(256, 300, seed=3)
        worse[0, 0] = float("inf")
        weight_blocks(worse, "layer 3: weight")
        with pytest.raises(NonFiniteError, match=r"layer 2: fprop input: non-finite .*\(2 of the 3 tensors"):
            fp8_quant.check_deferred()
        fp8_quant.check_deferred()   # cleared: the next step starts clean
        activation_tiles(_random(4, 300), "layer 1: fprop input")
        fp8_quant.check_deferred()
    finally:
        fp8_quant.defer_finite_checks(False)
