"""megatron-core patches (training/parallel/patches): pinned to one release, applied once per process by `apply_all`
(the CPU shim only without CUDA), never by building a model; and real MoE training steps in 1 and 2 processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.parallel import patches

HERE = Path(__file__).parent
REPO = HERE.parents[2]


def test_shim_refuses_to_run_where_cuda_exists(monkeypatch):
    from training.parallel.patches import cpu_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_device.apply()
    assert not cpu_device.apply.applied
    # and apply_all leaves the whole CPU shim out on such a machine
    names = [m.__name__.rsplit(".", 1)[1] for m in patches.patch_modules(cuda=True)]
    assert not [n for n in names if n.startswith("cpu_")] and "mtp_tokens_over_cp" in names


def test_every_patch_is_pinned_to_the_release_pyproject_pins():
    pinned = re.search(r'"megatron-core==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert patches.installed_megatron_core() == pinned
    for module in patches.patch_modules(cuda=False):
        assert module.MEGATRON_CORE == pinned, module.__name__
        assert module.__doc__ and len(module.__doc__) > 100, f"{module.__name__} must say what it fixes and why"
        patches.check_megatron_core(module)   # passes on the pinned release


def test_another_megatron_core_release_is_refused_loudly_before_anything_is_patched(monkeypatch):
    from training.parallel.patches import cpu_compile

    monkeypatch.setattr(patches, "installed_megatron_core", lambda: "0.17.0")
    monkeypatch.setattr(patches, "_applied", ())
    compile_before = torch.compile
    with pytest.raises(RuntimeError) as refused:
        patches.apply_all()
    message = str(refused.value)
    first = patches.patch_modules(cuda=torch.cuda.is_available())[0].__name__
    assert first in message and "megatron-core 0.16.1" in message and "megatron-core 0.17.0 is installed" in message
    assert "MEGATRON_CORE" in message             # says what to update once the gap is re-checked
    assert patches.applied() == () and torch.compile is compile_before and not cpu_compile.apply.applied


# What a GPU machine gets from prepare_backend, in a fresh process (it imports megatron-core without the CPU shim).
_ON_A_GPU = """
import inspect, json, torch
torch.cuda.is_available = lambda: True
from training.parallel import patches, setup
backend = setup.prepare_backend()
from megatron.core.models.gpt import gpt_model
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe import moe_utils
print(json.dumps({"backend": backend, "applied": patches.applied(),
                  "k_channels": "k_channels" in inspect.signature(DotProductAttention.__init__).parameters,
                  "recompute_fp8": [CheckpointWithoutOutput().fp8, CheckpointWithoutOutput(fp8="e4m3").fp8],
                  "router_gemm": moe_utils.te_general_gemm,
                  "mtp_counts_over_cp": getattr(gpt_model.roll_tensor, "counts_over_cp_group", False)}))
"""


def test_a_gpu_machine_gets_nccl_and_the_local_spec_patches_but_not_the_cpu_shim():
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _ON_A_GPU], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # CUDA tensors over NCCL; the stages' few CPU-tensor reductions (logged losses) over gloo, in one group
    assert seen["backend"] == "cpu:gloo,cuda:nccl"
    assert seen["applied"] == ["mla_local_attention", "torch_norm_sequence_parallel", "recompute_fp8_flag",
                               "router_gemm_without_te", "mtp_tokens_over_cp",
                               "dist_ckpt_results_queue"]   # no cpu_* module
    assert seen["k_channels"]                      # MLA's core attention can be the local DotProductAttention
    assert seen["recompute_fp8"] == [False, True]  # megatron's default fp8=False no longer means "FP8 on"
    assert seen["router_gemm"] is None             # the MoE router takes megatron's torch.mm path without TE
    assert seen["mtp_counts_over_cp"]


def _code(value) -> bool:
    import inspect

    return (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)
            or isinstance(value, (staticmethod, classmethod, property)))


def _patchable() -> dict[str, object]:
    """Every function and class that is a global of a loaded megatron-core or torch(.cuda) module, and the methods
    of those classes: what a patch replaces (data, such as a class's cached stream, is megatron's own business)."""
    seen = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("megatron.") or name in ("torch", "torch.cuda")):
            continue
        for attr, value in list(vars(module).items()):
            if not _code(value):
                continue
            seen[f"{name}.{attr}"] = value
            if isinstance(value, type) and value.__module__ == name:
                seen.update({f"{name}.{attr}.{k}": v for k, v in list(vars(value).items()) if _code(v)})
    return seen


def _device_mode_states() -> list[bool]:
    """Whether the CPU shim's device mode is the innermost torch function mode: before, inside and after
    `cpu_device.suspended()`; then inside it under another mode (which it leaves alone)."""
    from torch.overrides import TorchFunctionMode, _get_current_function_mode

    from training.parallel.patches import cpu_device

    def active():
        return _get_current_function_mode() is cpu_device._MODE

    states = [active()]
    with cpu_device.suspended():
        states.append(active())
    states.append(active())
    with TorchFunctionMode() as other, cpu_device.suspended():
        states.append(_get_current_function_mode() is other)
    return states + [active()]


def _probe() -> None:
    """In one process: patch once, build a model (with CP, where the MTP fix used to be installed), patch again."""
    from training.config import ModelConfig, ParallelConfig
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    import torch._dynamo  # noqa: F401  (torch's own lazy import rewraps torch.manual_seed: not a patch of ours)
    from megatron.core.models.gpt import gpt_model

    before, roll_tensor = _patchable(), gpt_model.roll_tensor
    build_gpt(ModelConfig(vocab_size=128, mtp_num_layers=1), ParallelConfig(context_parallel_size=2))
    built = _patchable()
    applied_again = patches.apply_all()
    again = _patchable()
    print(json.dumps({"device_mode": _device_mode_states(), 
        "applied": patches.applied(), "applied_again": applied_again, "checked": len(before),
        "roll_tensor_kept": gpt_model.roll_tensor is roll_tensor,
        "changed_by_build": sorted(k for k in before if built.get(k, before[k]) is not before[k]),
        "changed_by_second_apply": sorted(k for k in built if again.get(k, built[k]) is not built[k])}), flush=True)
    shutdown()


def test_building_a_model_patches_nothing_and_apply_all_runs_once():
    from tests.support.processes import run_probe

    seen = run_probe(__file__)
    assert seen["applied"][:5] == ["cpu_compile", "cpu_triton", "cpu_device", "cpu_rng", "cpu_alltoall_split_sizes"]
    assert seen["applied"][-2:] == ["mtp_tokens_over_cp", "dist_ckpt_results_queue"]
    assert seen["applied_again"] == seen["applied"]
    assert seen["checked"] > 1000                 # megatron-core's modules were really looked at
    assert seen["roll_tensor_kept"]
    assert seen["changed_by_build"] == [] and seen["changed_by_second_apply"] == []
    # decoding lifts the device mode (training/eval/generate.py) and puts it back; another mode on top is left alone
    assert seen["device_mode"] == [True, False, True, True, True]


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
@pytest.mark.parametrize("dispatcher", ["allgather"])   # alltoall, the default: test_parallel_layouts.py's EP2
def test_moe_step_two_processes_expert_parallel(dispatcher, single_process_steps):
    from tests.support.processes import torchrun

    steps = _steps([sys.executable, "-W", "ignore", *torchrun(2),
                    str(HERE / "mcore_step.py"), "ep=2", f"dispatcher={dispatcher}"])
    _assert_trains(steps, world=2)
    single = single_process_steps
    # Same data and dense weights; experts are seeded per expert-parallel rank, so losses agree closely, not exactly.
    assert abs(steps[0]["loss"] - single[0]["loss"]) < 0.05 * single[0]["loss"]


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    _probe()


_RESULTS_QUEUE = """
import json, psutil
from megatron.core.dist_checkpointing.strategies import filesystem_async
from training.parallel.patches import apply_all
before = filesystem_async._get_write_results_queue
apply_all()
queue = filesystem_async._get_write_results_queue()
queue.put({"written": list(range(100000))})   # a synchronous save: put, then read at once by get_nowait
got = queue.get_nowait()
print(json.dumps({"replaced": filesystem_async._get_write_results_queue is not before,
                  "same": filesystem_async._get_write_results_queue() is queue, "got": len(got["written"]),
                  "children": [p.cmdline() for p in psutil.Process().children(recursive=True)]}))
"""


def test_checkpoint_writes_start_no_manager_process():
    """megatron's write-results queue would spawn a Manager server process (a fresh interpreter that outlives a killed
    trainer); the patched one is a plain queue that forked writers inherit."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _RESULTS_QUEUE], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"replaced": True, "same": True, "got": 100000, "children": []}, seen
