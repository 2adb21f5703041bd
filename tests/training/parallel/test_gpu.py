"""The pretrain stage on a CUDA device: the same run as on the CPU, on the GPU. Needs a GPU, so CI (CPU-only)
reports these as skipped; on a GPU machine run `pytest -m gpu`.

The CPU run on the same machine hides the GPU (CUDA_VISIBLE_DEVICES=""), so it takes the CPU shim as CI does."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.support.processes import REPO
from tests.support.layouts import command, losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _train(cmd, run_root, hide_gpu: bool) -> dict[int, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"CUDA_VISIBLE_DEVICES": ""} if hide_gpu else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return losses(run_root)


@pytest.mark.parametrize("overrides, tolerance", [
    ([], 1e-4),   # fp32 both; the GPU's kernels sum in other orders
    (["parallel.recompute=[core_attn,layernorm,mla_up_proj,moe]"], 1e-4),
    (["train.precision=bf16"], 2e-3),   # bf16 matmuls round differently on each device
    (["train.precision=bf16", "parallel.moe_grouped_gemm=true"], 2e-3),   # torch._grouped_mm's experts
    # the scaled_mm kernel against the CPU emulation; the bf16 around it as above (test_fp8_training's tolerance)
    (["train.precision=fp8", "train.fp8_shadow_interval=null"], 1e-2),
], ids=["fp32", "recompute", "bf16", "bf16-grouped", "fp8"])
def test_pretrain_on_the_gpu_matches_the_cpu(micro_corpus, tmp_path, overrides, tolerance):
    on_gpu = _train(command(tmp_path / "gpu", micro_corpus, 1, *overrides), tmp_path / "gpu", hide_gpu=False)
    on_cpu = _train(command(tmp_path / "cpu", micro_corpus, 1, *overrides), tmp_path / "cpu", hide_gpu=True)
    assert sorted(on_gpu) == sorted(on_cpu)
    for step in on_cpu:
        assert abs(on_gpu[step] - on_cpu[step]) <= tolerance * on_cpu[step], (step, on_gpu, on_cpu)
    assert len(set(on_gpu.values())) == len(on_gpu)   # the weights moved
