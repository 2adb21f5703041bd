"""Process groups: torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's model-parallel groups."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ParallelConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_backend() -> str:
    """Apply every megatron-core patch for this machine (`training.parallel.patches.apply_all`: the CPU shim only
    when CUDA is absent) and pick the collective backend. On GPUs, CUDA tensors go through NCCL and the few CPU
    tensors the stages reduce (logged losses) through gloo, from one process group."""
    from training.parallel import patches

    patches.apply_all()
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel: ParallelConfig, seed: int) -> DistInfo:
    """Initialise torch.distributed from torchrun's env (or a 1-process default) and megatron's parallel groups."""
    backend = prepare_backend()
    # Without torchrun: one process, whose store lives in memory (no port to pick, so none to race for).
    alone = "RANK" not in os.environ
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = backend != "gloo"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if alone:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    world = dist.get_world_size()
    model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                      * parallel.context_parallel_size)
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline x context parallel size "
                         f"{model_parallel}")
    if (world // parallel.pipeline_model_parallel_size) % parallel.expert_model_parallel_size:
        raise ValueError(f"world size {world} cannot host expert_model_parallel_size "
                         f"{parallel.expert_model_parallel_size} per pipeline stage")

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=device)


def shutdown(failed: bool = False) -> None:
    """Tear down the process groups. A `failed` rank skips the final barrier: the other ranks may be waiting in a
    different collective, and a rank that exits (rather than waits) lets torchrun stop the whole job."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        if not failed:
            dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextmanager
def distributed(parallel: ParallelConfig, seed: int) -> Iterator[DistInfo]:
    """`init_distributed` for the block, then `shutdown`: without the final barrier when the block raised."""
    info = init_distributed(parallel, seed)
    try:
        yield info
    except BaseException:
        shutdown(failed=True)
        raise
    shutdown()
