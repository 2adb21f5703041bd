"""Every change seekflow makes to megatron-core (and to torch on CPU-only machines), one module per gap.

`apply_all()` applies them once per process, in this order, before any model is built:

1. the CPU shim, only when CUDA is absent (megatron-core assumes CUDA throughout; measured in shared/FACTS.md):
   `cpu_compile` (torch.compile off), `cpu_triton` (a stand-in triton package), `cpu_device` (cuda devices become
   cpu, `torch.cuda` stand-ins for streams and events), `cpu_rng` (CUDA RNG state on the CPU generator),
   `cpu_alltoall_split_sizes` (the alltoall dispatcher's host copies);
2. the gaps of megatron-core's "local" (non-Transformer-Engine) layer spec, on every device, since seekflow builds
   every model from that spec: `mla_local_attention`, `torch_norm_sequence_parallel`, `recompute_fp8_flag`,
   `router_gemm_without_te`;
3. `mtp_tokens_over_cp`: the MTP loss's token count under context parallelism, on every device;
4. `dist_ckpt_results_queue`: checkpoint writes pass their results through a fork-context queue instead of a
   spawned Manager process (2 s per process, and an orphan when the trainer is killed), on every device.

Nothing else patches: building a model (`training.model.build`) only reads megatron-core. Call `apply_all()` at
process setup (`training.parallel.setup.prepare_backend` does, from `init_distributed`).

Each module names the megatron-core release whose source it was checked against (`MEGATRON_CORE`), and
`apply_all()` refuses to patch any other release (`check_megatron_core`): an upgrade fails loudly, naming the
module, until someone re-reads that gap in the new source and updates the module's pin with pyproject's.
"""
from __future__ import annotations

import importlib.metadata
from types import ModuleType

_applied: tuple[str, ...] = ()


def installed_megatron_core() -> str:
    """The installed megatron-core release, read from its package metadata (megatron itself is not imported: the CPU
    shim must be in place before it is)."""
    return importlib.metadata.version("megatron-core")


def check_megatron_core(module: ModuleType) -> None:
    """Fail loudly unless megatron-core is the release `module` was checked against."""
    checked, installed = module.MEGATRON_CORE, installed_megatron_core()
    if installed != checked:
        raise RuntimeError(
            f"{module.__name__} patches megatron-core {checked}, but megatron-core {installed} is installed: read "
            f"the gap it fills in {installed}'s source, then fix or drop the patch and set its MEGATRON_CORE to "
            f"{installed!r} (and pyproject's pin)")


def patch_modules(cuda: bool) -> tuple[ModuleType, ...]:
    """The patch modules for a machine with (`cuda`) or without CUDA, in the order they are applied."""
    from training.parallel.patches import (cpu_alltoall_split_sizes, cpu_compile, cpu_device, cpu_rng, cpu_triton,
                                           dist_ckpt_results_queue, mla_local_attention, mtp_tokens_over_cp,
                                           recompute_fp8_flag, router_gemm_without_te, torch_norm_sequence_parallel)

    cpu_shim = () if cuda else (cpu_compile, cpu_triton, cpu_device, cpu_rng, cpu_alltoall_split_sizes)
    local_spec_gaps = (mla_local_attention, torch_norm_sequence_parallel, recompute_fp8_flag, router_gemm_without_te)
    return (*cpu_shim, *local_spec_gaps, mtp_tokens_over_cp, dist_ckpt_results_queue)


def apply_all() -> tuple[str, ...]:
    """Apply every patch for this machine, once per process; returns the names of the modules applied. All are
    version-checked before the first is applied, so a refused upgrade leaves the process unpatched."""
    global _applied
    if _applied:
        return _applied
    import torch

    modules = patch_modules(cuda=torch.cuda.is_available())
    for module in modules:
        check_megatron_core(module)
    for module in modules:
        module.apply()
    _applied = tuple(module.__name__.rsplit(".", 1)[1] for module in modules)
    return _applied


def applied() -> tuple[str, ...]:
    """Names of the patch modules `apply_all()` has applied in this process (empty before it runs)."""
    return _applied
