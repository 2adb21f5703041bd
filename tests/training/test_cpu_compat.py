"""The megatron-core CPU shim: applied only without CUDA, and real MoE training steps run in 1 and 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def test_shim_refuses_to_run_where_cuda_exists(monkeypatch):
    from training.parallel import cpu_compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.apply()
    assert not cpu_compat.is_applied()


# What a GPU machine gets from prepare_backend, in a fresh process (it imports megatron-core without the CPU shim).
_ON_A_GPU = """
import inspect, json, torch
torch.cuda.is_available = lambda: True
from training.parallel import cpu_compat, local_spec_gaps, setup
backend = setup.prepare_backend()
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.dot_product_attention import DotProductAttention
print(json.dumps({"backend": backend, "shim": cpu_compat.is_applied(), "gaps": local_spec_gaps.is_applied(),
                  "k_channels": "k_channels" in inspect.signature(DotProductAttention.__init__).parameters,
                  "recompute_fp8": [CheckpointWithoutOutput().fp8, CheckpointWithoutOutput(fp8="e4m3").fp8]}))
"""


def test_a_gpu_machine_gets_nccl_and_the_local_spec_patches_but_not_the_cpu_shim():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _ON_A_GPU], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # CUDA tensors over NCCL; the stages' few CPU-tensor reductions (logged losses) over gloo, in one group
    assert seen["backend"] == "cpu:gloo,cuda:nccl"
    assert not seen["shim"] and seen["gaps"]
    assert seen["k_channels"]                      # MLA's core attention can be the local DotProductAttention
    assert seen["recompute_fp8"] == [False, True]  # megatron's default fp8=False no longer means "FP8 on"


def _steps(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _assert_trains(steps: list[dict], world: int) -> None:
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert all(s["world"] == world and s["shim"] for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1          # the optimizer really stepped
    assert steps[-1]["expert_bias_abs_sum"] > 0                # aux-loss-free bias updated in finalize_model_grads


@pytest.fixture(scope="module")
def single_process_steps():
    return _steps([sys.executable, "-W", "ignore", str(HERE / "mcore_step.py")])


def test_moe_step_single_process(single_process_steps):
    _assert_trains(single_process_steps, world=1)


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_step_two_processes_expert_parallel(dispatcher, single_process_steps):
    steps = _steps([sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc-per-node=2",
                    str(HERE / "mcore_step.py"), "ep=2", f"dispatcher={dispatcher}"])
    _assert_trains(steps, world=2)
    single = single_process_steps
    # Same data and dense weights; experts are seeded per expert-parallel rank, so losses agree closely, not exactly.
    assert abs(steps[0]["loss"] - single[0]["loss"]) < 0.05 * single[0]["loss"]
