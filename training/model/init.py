"""Layout-invariant weight initialisation: the same seed gives the same weights under any parallel layout.

megatron-core draws initial weights from the process's RNG in module-construction order, so what a weight gets
depends on which modules this rank builds: a pipeline stage or an expert-parallel rank that skips modules draws
different numbers than one process holding the whole model (`use_cpu_initialization` only makes tensor-parallel
shards agree). Here every weight is redrawn from a generator seeded by its checkpoint key (which carries the global
layer number) and its global position (expert index), with megatron's own init method for that weight, and each rank
keeps the slice its sharded state dict says it owns. So 1 process, TP, PP, EP and DP all start from the same model.
"""
from __future__ import annotations

import hashlib

import torch

# Output projections get megatron's scaled init (std / sqrt(2 * num_layers)); every other random weight gets
# `init_method` (megatron-core 0.16: attention/MLA linear_proj, MLP/expert/shared-expert linear_fc2).
_OUTPUT_LAYER_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")
_BLOCK_ELEMENTS = 1 << 20   # rows are drawn in blocks of about this many numbers: a rank draws only its row blocks


def _seed(seed: int, key: str, prepended: tuple[int, ...], block: int) -> int:
    text = f"{seed}/{key}/{prepended}/{block}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def _draw(shape: tuple[int, ...], init, seed: int) -> torch.Tensor:
    """`init` applied to a fresh tensor with the global RNG seeded to `seed` (megatron's init methods use it)."""
    out = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init(out)
    return out


def _fill(sh, init, seed: int) -> None:
    """Write this rank's slice of the global tensor that `sh` (a ShardedTensor viewing a parameter) is part of."""
    prepended = tuple(sh.global_offset[:sh.prepend_axis_num])
    global_shape = tuple(sh.global_shape[sh.prepend_axis_num:])
    offsets = sh.global_offset[sh.prepend_axis_num:]
    local = sh.data   # its shape is the local shape without the prepended axes
    rows_start, rows = offsets[0], local.shape[0]
    row_numel = max(1, int(torch.Size(global_shape[1:]).numel()))
    block_rows = max(1, _BLOCK_ELEMENTS // row_numel)
    cols = tuple(slice(o, o + n) for o, n in zip(offsets[1:], local.shape[1:]))
    for block in range(rows_start // block_rows, (rows_start + rows - 1) // block_rows + 1):
        first = block * block_rows
        drawn = _draw((min(block_rows, global_shape[0] - first), *global_shape[1:]), init,
                      _seed(seed, sh.key, prepended, block))
        lo, hi = max(first, rows_start), min(first + drawn.shape[0], rows_start + rows)
        local[lo - rows_start:hi - rows_start].copy_(drawn[(slice(lo - first, hi - first), *cols)])


def _sharded_tensors(model):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for value in nested_values(model.sharded_state_dict(metadata=metadata)):
        if isinstance(value, ShardedTensorFactory):   # e.g. SwiGLU's fc1: its w and v halves are separate shards
            yield from (v for v in nested_values(value.build()) if isinstance(v, ShardedTensor))
        elif isinstance(value, ShardedTensor):
            yield value


@torch.no_grad()
def reinitialize(model, config, seed: int) -> None:
    """Redraw every randomly initialised parameter of `model` (a megatron GPTModel) layout-invariantly.

    Constant-initialised parameters (norm weights) are already the same everywhere and are left alone; a random
    parameter that no sharded-state-dict entry covers is an error rather than a silently layout-dependent weight."""
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    written = {id(p): 0 for p in params.values()}
    for sh in _sharded_tensors(model):
        param = params.get(sh.data.untyped_storage().data_ptr())
        if param is None or _is_constant(param):
            continue
        output_layer = sh.key.endswith(_OUTPUT_LAYER_SUFFIXES)
        _fill(sh, config.output_layer_init_method if output_layer else config.init_method, seed)
        written[id(param)] += sh.data.numel()
    missed = [name for name, p in model.named_parameters() if not _is_constant(p) and written[id(p)] != p.numel()]
    if missed:
        raise RuntimeError(f"layout-invariant init: no sharded state dict entry covers {missed}")


def _is_constant(param: torch.Tensor) -> bool:
    flat = param.detach().reshape(-1)
    return bool((flat == flat[0]).all())
