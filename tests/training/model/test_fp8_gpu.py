"""The GPU backends of issue 19 on a Hopper GPU (`pytest -m gpu`; CI, CPU-only, reports them skipped): torch's
blockwise scaled_mm against the CPU emulation for the three GEMMs of an FP8 linear, and torch._grouped_mm's experts
against the sequential ones in bf16. The pretrain stage in FP8 and with grouped experts, GPU against CPU:
tests/training/parallel/test_gpu.py."""
from __future__ import annotations

import pytest
import torch

from training.model.fp8_linear import fp8_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tokens, out_features, in_features", [(7, 192, 64), (300, 2048, 7168), (256, 512, 384)])
def test_scaled_mm_computes_what_the_emulation_computes(tokens, out_features, in_features):
    """Same quantisation on both devices; the kernel accumulates in float32 as the emulation does, and rounds its
    output to bf16 (the emulation's output is rounded to the input's bf16 too)."""
    results = {}
    for device in ("cpu", "cuda"):
        x = _random(tokens, in_features).bfloat16().to(device).requires_grad_()
        w = _random(out_features, in_features, seed=1).bfloat16().to(device).requires_grad_()
        y = fp8_linear(x, w, "probe")
        y.backward(_random(tokens, out_features, seed=2).bfloat16().to(device))
        results[device] = [t.float().cpu() for t in (y, x.grad, w.grad)]
    for name, cpu, gpu in zip(("fprop", "dgrad", "wgrad"), results["cpu"], results["cuda"]):
        error = (gpu - cpu).norm() / cpu.norm()
        assert error < 1e-2, (name, float(error))   # bf16 output rounding (2^-8) and summation order


def test_grouped_mm_experts_match_per_expert_matmuls_in_bf16():
    from training.model.grouped_experts import grouped_mm

    counts = [3, 0, 200, 17, 0, 64, 1, 99]
    x = _random(sum(counts), 256).bfloat16().cuda()
    weights = _random(len(counts), 512, 256, seed=1).bfloat16().cuda()
    offsets = torch.cumsum(torch.tensor(counts, device="cuda"), 0).to(torch.int32)
    grouped = grouped_mm(x, weights, offsets).float()
    sequential = torch.cat([rows.float() @ w.float().t()
                            for rows, w in zip(torch.split(x, counts), weights)]).bfloat16().float()
    assert ((grouped - sequential).norm() / sequential.norm()) < 1e-2
