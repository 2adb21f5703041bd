"""Child-Tuning (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"): each optimizer step updates only a
child network of the parameter elements; the config is training/config/child_tuning.py.

- Child-Tuning_F (task_free): each step keeps a Bernoulli(p_F) share of the elements, their gradients scaled by 1/p_F.
- Child-Tuning_D (task_driven): before training, Fisher information (the sum over the first `fisher_batches` task
  batches of each element's squared gradient) picks the top p_D share of all elements, over every rank; only those
  are ever updated. (The authors' code also clips each batch's gradient per tensor and ranks encoder layers only.)

Left out means unchanged, bit for bit: the element's value and its AdamW moments. A zero gradient is not enough:
megatron's AdamW still decays exp_avg and exp_avg_sq, moves the weight by exp_avg / sqrt(exp_avg_sq) and shrinks it
by decoupled weight decay. The authors' ChildTuningAdamW masks the gradient inside AdamW's step and lets all of that
happen; the paper's update rule (w <- w - lr * grad * M) and this module do not. How: pre- and post-hooks on each
inner torch optimizer (the one megatron's optimizer wraps: it steps the fp32 main parameters, or this rank's shard of
them). The pre-hook masks (for _F, scales) the gradient and copies out the left-out elements of the parameter and of
every state tensor of its shape; the post-hook writes them back. Both run inside megatron's step, after clipping (so
clipping and grad_norm see the whole gradient, as where the paper clips before its optimizer step) and before the
main parameters are copied to the model and all-gathered, so every copy of an element agrees. AdamW's per-tensor
`step` still advances: a kept element's bias correction counts the steps it sat out, as in torch's SparseAdam.
Buffers (the router's expert bias, moved by its balancing rule) are not parameters and are not masked.

Layouts (TP, PP, EP, DP, the distributed optimizer): masks are per element of what the optimizer steps. _F's draw is a
hash of (seed, step, the element's checkpoint key and global index): the same element gets the same draw under any
layout, and tensor-parallel replicas of a norm stay identical. _D's threshold is the exact k-th largest Fisher value
(k = ceil(p_D x elements)) over all ranks, by a radix select on the float bits whose histograms sum over the world each
element once (the copy the checkpoint calls main, or its data-parallel shard). Ties at the threshold are all kept
(the paper's `>= np.percentile`); an element with zero Fisher information is never chosen.
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training.config.child_tuning import ChildTuningConfig
from training.train.trainer import Callback

_M32 = 0xFFFFFFFF
_BINS = 1 << 16   # a float32's bits in two 16-bit halves: two histogram passes find the exact k-th largest value


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32"), on int64 tensors holding values in [0, 2^32)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _keys(text: str) -> tuple[int, int]:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _sharded_identities(sh) -> torch.Tensor:
    """A 32-bit hash of (checkpoint key, prepended offsets, global index) for each element of `sh.data`: the same
    number for the same element of the model under any parallel layout."""
    prepend = sh.prepend_axis_num
    k1, k2 = _keys(f"{sh.key}/{tuple(sh.global_offset[:prepend])}")
    index = torch.zeros((), dtype=torch.int64)
    for dim, (size, offset, extent) in enumerate(zip(sh.data.shape, sh.global_offset[prepend:],
                                                     sh.global_shape[prepend:])):
        shape = [1] * sh.data.dim()
        shape[dim] = size
        index = index * extent + torch.arange(offset, offset + size).view(shape)
    return _mix32(_mix32((index & _M32) ^ k1) ^ (k2 ^ (index >> 32)))


def _parameter_views(chunks):
    """(parameter, positions of the view's elements in the parameter's flat view, ShardedTensor) for every view of a
    parameter in the chunks' (unwrapped GPT modules') sharded state dicts: what a checkpoint names each element."""
    from training.model.init import _sharded_tensors

    for chunk in chunks:
        by_storage: dict[int, list] = {}
        for p in chunk.parameters():
            by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
        for sh in _sharded_tensors(chunk):
            data = sh.data
            owner = [p for p in by_storage.get(data.untyped_storage().data_ptr(), [])
                     if p.storage_offset() <= data.storage_offset() < p.storage_offset() + p.numel()]
            if owner and owner[0].requires_grad:   # else a buffer (the router's expert bias)
                positions = torch.arange(owner[0].numel()).as_strided(
                    data.shape, data.stride(), data.storage_offset() - owner[0].storage_offset())
                yield owner[0], positions.reshape(-1), sh


def element_facts(chunks) -> tuple[dict[int, torch.Tensor], dict[int, bool]]:
    """Per parameter of the chunks (by id): its elements' layout-invariant identities (int64 [numel]), and whether
    this rank holds its main copy (the checkpoint's replica id is 0 in every component: tensor-, data- and
    expert-data-parallel replicas, or a pipeline stage's copy of a shared embedding, are not)."""
    params = {id(p): (n, p) for chunk in chunks for n, p in chunk.named_parameters() if p.requires_grad}
    identities = {i: torch.full((p.numel(),), -1, dtype=torch.int64) for i, (_, p) in params.items()}
    main: dict[int, set] = {i: set() for i in params}
    for param, positions, sh in _parameter_views(chunks):
        identities[id(param)][positions] = _sharded_identities(sh).reshape(-1)
        replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        main[id(param)].add(all(r == 0 for r in replica))
    odd = [n for i, (n, _) in params.items() if bool((identities[i] < 0).any()) or len(main[i]) != 1]
    if odd:
        raise RuntimeError(f"Child-Tuning: the sharded state dict does not cover, or partly replicates, {odd}")
    return identities, {i: flags.pop() for i, flags in main.items()}


@dataclass(eq=False)
class Slot:
    """One tensor the inner optimizer steps: `inner` holds elements [start, end) of `model_param` (flattened): the
    parameter itself, its fp32 main copy, or this rank's shard of either under the distributed optimizer."""

    name: str
    inner: torch.Tensor
    model_param: torch.nn.Parameter
    start: int
    end: int
    counted: bool                          # the copy of these elements that counts (each element counts once)
    identity: torch.Tensor | None = None   # _F: the elements' layout-invariant identities (int32 bits)
    child: torch.Tensor | None = None      # _D: the child network's elements

    def model_grad(self) -> torch.Tensor:
        """The reduced gradient of these elements in DDP's buffer (after finalize_model_grads), shaped as `inner`."""
        return self.model_param.main_grad.view(-1)[self.start:self.end].view_as(self.inner)


def optimizer_slots(sub, names: dict[int, str], main: dict[int, bool]) -> list[Slot]:
    """The slots of one megatron optimizer (not a ChainedOptimizer), covering every parameter its inner one steps.
    A shard (distributed optimizer) counts if its parameter's main copy is in its data-parallel group, a whole
    parameter if it is the main copy. (megatron's grad-norm rule, "not a TP duplicate", would count the experts
    twice under TP2 with expert-TP 1, where both TP ranks hold every expert.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if sub.optimizer is None:   # a stub: no parameters on this rank
        return []
    if getattr(sub.config, "use_precision_aware_optimizer", False):
        raise ValueError("Child-Tuning and pruning do not support megatron's precision-aware optimizer")
    pairs = []   # (inner, model parameter, start, end)
    if isinstance(sub, DistributedOptimizer):
        for models, shards in ((sub.model_float16_groups, sub.shard_fp32_from_float16_groups),
                               (sub.model_fp32_groups, sub.shard_fp32_groups)):
            for model_group, shard_group in zip(models, shards):
                for model_param, shard in zip(model_group, shard_group):
                    bounds = sub._get_model_param_range_map(model_param)["param"]   # this rank's share
                    pairs.append((shard, model_param, bounds.start, bounds.end))
        # the same parameters, in the same order, on every rank of the group: is the main copy among them?
        in_buffers = [p for buffer in sub.buffers for p in buffer.params]
        device = sub.buffers[0].grad_data.device
        flags = torch.tensor([main[id(p)] for p in in_buffers], dtype=torch.int64, device=device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=sub.data_parallel_group)
        counts = {id(p): bool(flag) for p, flag in zip(in_buffers, flags.tolist())}
    else:
        if isinstance(sub, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                pairs += [(main_param, p, 0, p.numel()) for p, main_param in zip(model_group, main_group)]
            pairs += [(p, p, 0, p.numel()) for group in sub.fp32_from_fp32_groups for p in group]
        else:   # FP32Optimizer: the inner optimizer steps the model parameters themselves
            pairs += [(p, p, 0, p.numel()) for group in sub.optimizer.param_groups for p in group["params"]]
        counts = main
    stepped = {id(p) for group in sub.optimizer.param_groups for p in group["params"]}
    if stepped != {id(inner) for inner, *_ in pairs}:
        raise RuntimeError(f"cannot map the parameters of {type(sub).__name__} to the model's")
    return [Slot(names[id(p)], inner, p, start, end, counted=counts[id(p)]) for inner, p, start, end in pairs]


@contextmanager
def quiet_passes(module):
    """Passes that see the model as it is and leave no trace: RNG streams, aux-loss trackers, grad-finalize hooks
    (expert-load metrics) and every buffer (expert bias and token counts, which finalize_model_grads moves: `reset()`
    puts them back after each batch) are as before."""
    from training import checkpoint
    from training.train.losses import clear_loss_trackers

    rng = checkpoint.rng_states()
    buffers = [(b, b.detach().clone()) for chunk in module.chunks for b in chunk.buffers()]
    hooks = list(module.grad_finalize_hooks)
    module.grad_finalize_hooks.clear()

    @torch.no_grad()
    def reset() -> None:
        for buffer, value in buffers:
            buffer.copy_(value)

    try:
        yield reset
    finally:
        module.grad_finalize_hooks.extend(hooks)
        reset()
        for chunk in module.wrapped:
            chunk.zero_grad_buffer()
        clear_loss_trackers()
        checkpoint.restore_rng_states(rng)


def fisher_information(module, slots: list[Slot], num_batches: int) -> list[torch.Tensor]:
    """Per slot, the sum over the first `num_batches` global batches of the run's data (from sample 0, whatever the
    data position) of the squared gradient of the module's loss: megatron's forward/backward schedule, so the batch
    loss is the training step's (per-micro-batch token means over the micro-batches, averaged over data-parallel
    ranks) and the gradients are reduced as for a step. Run after `module.start()`; changes no weight or state."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from training.data.gpt_data import MicroBatches

    if module.chunk_batches is None:
        raise RuntimeError("fisher_information needs the module's batches: call module.start() first")
    train = module.cfg.train
    readers = [MicroBatches(module.batches.dataset, micro_batch_size=train.micro_batch_size,
                            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=module.dp_size)
               for _ in module.wrapped]
    fisher = [torch.zeros(slot.inner.shape, dtype=torch.float32, device=slot.inner.device) for slot in slots]
    with quiet_passes(module) as reset:
        for _ in range(num_batches):
            for chunk in module.wrapped:
                chunk.zero_grad_buffer()
            get_forward_backward_func()(
                forward_step_func=module.forward_step, model=module.wrapped,
                data_iterator=readers if len(readers) > 1 else readers[0],
                num_microbatches=train.global_batch_size // module.ramp.per_step, seq_length=train.seq_length,
                micro_batch_size=train.micro_batch_size, forward_only=False)
            for total, slot in zip(fisher, slots):
                total.add_(slot.model_grad().float().square())
            reset()
    return fisher


class ChildTuning:
    """Child-Tuning on a megatron optimizer (a ChainedOptimizer or one optimizer) over the model `chunks` (unwrapped
    GPT modules). The GPT train module runs each optimizer step inside `masking(step)`; Child-Tuning_D also needs its
    child network fixed first (`select_child_network`, which the `ChildNetwork` callback calls)."""

    def __init__(self, config: ChildTuningConfig, optimizer, chunks, seed: int):
        if config.mode == "off":
            raise ValueError("ChildTuning with child_tuning.mode 'off'")
        self.config, self.seed = config, seed
        self.optimizers = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        names = {id(p): (f"chunk{i}." if len(chunks) > 1 else "") + n
                 for i, chunk in enumerate(chunks) for n, p in chunk.named_parameters()}
        identities, main = element_facts(chunks)
        self.slots = [slot for sub in self.optimizers for slot in optimizer_slots(sub, names, main)]
        if config.mode == "task_free":
            for slot in self.slots:   # int32 bits of the 32-bit identities: 4 bytes per element stepped here
                own = identities[id(slot.model_param)][slot.start:slot.end]
                own = torch.where(own >= 2 ** 31, own - 2 ** 32, own).to(torch.int32)
                slot.identity = own.view(slot.inner.shape).to(slot.inner.device)
        self.step, self.saved = None, {}   # set while `masking` runs; the pre-hooks' copies of left-out elements
        by_inner = {id(slot.inner): slot for slot in self.slots}
        for sub in self.optimizers:
            if sub.optimizer is not None:
                sub.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before(opt, by_inner))
                sub.optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after(opt))

    @contextmanager
    def masking(self, step: int):
        """Mask the optimizer steps taken inside this block as step number `step` (0-based; _F draws from it).
        Outside it the hooks do nothing (megatron's own dummy steps when it loads a checkpoint)."""
        if self.config.mode == "task_driven" and any(slot.child is None for slot in self.slots):
            raise RuntimeError("Child-Tuning_D has no child network yet: put training.train.child_tuning."
                               "ChildNetwork among the Trainer's callbacks (or call select_child_network)")
        self.step = step
        try:
            yield
        finally:
            self.step, self.saved = None, {}

    def kept(self, slot: Slot, step: int) -> torch.Tensor:
        """The elements of `slot` that step number `step` updates."""
        if self.config.mode == "task_driven":
            return slot.child
        k1, k2 = _keys(f"child-tuning/{self.seed}/{step}")
        draws = _mix32(_mix32((slot.identity.long() & _M32) ^ k1) ^ k2)
        return draws < round(self.config.p_f * 2 ** 32)

    @torch.no_grad()
    def _before(self, optimizer, by_inner: dict[int, Slot]) -> None:
        if self.step is None:
            return
        saved = self.saved.setdefault(id(optimizer), [])
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:   # AdamW skips it: nothing changes
                    continue
                left_out = ~self.kept(by_inner[id(p)], self.step)
                if self.config.mode == "task_free":
                    p.grad.div_(self.config.p_f)   # the kept gradients scaled by 1/p_F (their expectation is kept)
                p.grad.masked_fill_(left_out, 0.0)
                state = optimizer.state.get(p, {})
                values = {name: t[left_out] for name, t in state.items() if _elementwise(t, p)}   # copies
                saved.append((p, left_out, p[left_out], values))

    @torch.no_grad()
    def _after(self, optimizer) -> None:
        if self.step is None:
            return
        for p, left_out, value, values in self.saved.pop(id(optimizer), []):
            p.masked_scatter_(left_out, value)
            for name, t in optimizer.state[p].items():
                if not _elementwise(t, p):
                    continue
                if name in values:
                    t.masked_scatter_(left_out, values[name])
                else:   # created by this step (lazily, as zeros): stays zero where left out
                    t.masked_fill_(left_out, 0.0)

    def select_child_network(self, module) -> dict:
        """Fix the child network on the module's first `fisher_batches` batches (every rank calls it)."""
        return self.fix_child_network(fisher_information(module, self.slots, self.config.fisher_batches))

    def fix_child_network(self, fisher: list[torch.Tensor]) -> dict:
        """The child network: per slot, the elements whose Fisher value (float32, one tensor per slot) is above zero
        and at least the global k-th largest, k = ceil(p_D x all elements). Returns the global counts and threshold."""
        if any(not bool(torch.isfinite(f).all()) for f in fisher):
            raise FloatingPointError("Child-Tuning_D: the Fisher information is not finite")
        bits = [f.contiguous().view(torch.int32).view(-1) for f in fisher]   # a float >= 0 orders as its bits
        elements = int(self._global(lambda i: torch.tensor([bits[i].numel()], device=bits[i].device), 1))
        k = max(1, math.ceil(self.config.p_d * elements))
        high = self._global(lambda i: torch.bincount(bits[i] >> 16, minlength=_BINS), _BINS)
        top = _last_reaching(high, k)
        above = int(high[top + 1:].sum())
        low = self._global(lambda i: torch.bincount(bits[i][bits[i] >> 16 == top] & 0xFFFF, minlength=_BINS), _BINS)
        threshold = max((top << 16) | _last_reaching(low, k - above), 1)   # never an element with zero Fisher
        for slot, b in zip(self.slots, bits):
            slot.child = (b >= threshold).view(slot.inner.shape)
        child = int(self._global(lambda i: self.slots[i].child.sum().view(1), 1))
        value = torch.tensor([threshold], dtype=torch.int32).view(torch.float32).item()
        return {"elements": elements, "child": child, "threshold": value}

    def _global(self, local, size: int) -> torch.Tensor:
        """Σ of `local(slot index)` (`size` counts) over the counted slots of every rank: each element once."""
        device = self.slots[0].inner.device if self.slots else torch.device("cpu")
        total = torch.zeros(size, dtype=torch.int64, device=device)
        for i, slot in enumerate(self.slots):
            if slot.counted:
                total += local(i).to(device=device, dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(total)
        return total


def _elementwise(t, p: torch.Tensor) -> bool:
    """A per-element optimizer state tensor of `p` (exp_avg, exp_avg_sq, ...), not the per-tensor step count."""
    return isinstance(t, torch.Tensor) and t.shape == p.shape and t.is_floating_point()


def _last_reaching(histogram: torch.Tensor, k: int) -> int:
    """The largest bin b with at least k counts in bins >= b."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)
    return int((at_or_above >= k).nonzero().max())


class ChildNetwork(Callback):
    """Fixes Child-Tuning_D's child network before the first step, on the weights the run starts from. A resumed run
    estimates it again on those (the trainer's initial weights, loaded for the estimate, then put back) and the same
    batches, so it gets the same child network; without initial weights (a random init) it refuses."""

    def pre_train(self, trainer) -> None:
        module = trainer.module
        child = getattr(module, "child_tuning", None)
        if child is None or child.config.mode != "task_driven":
            return
        if trainer.step == 0:
            found = child.select_child_network(module)
        elif trainer.init_weights is None:
            raise RuntimeError(f"Child-Tuning_D resumed at step {trainer.step} of a run without initial weights "
                               f"(init_checkpoint): its child network comes from the weights the run started from")
        else:
            with _weights_of(module, trainer.init_weights.fetch()):
                found = child.select_child_network(module)
        if trainer.is_main:
            print(f"{trainer.label}: Child-Tuning_D child network: {found['child']} of {found['elements']} elements "
                  f"(Fisher >= {found['threshold']:.3e} over {child.config.fisher_batches} batches)", flush=True)


@contextmanager
def _weights_of(module, release: Path):
    """The model holds `release`'s weights (and buffers: the expert bias) inside the block, its own again after it."""
    from training import checkpoint

    tensors = [t for chunk in module.chunks for t in (*chunk.parameters(), *chunk.buffers())]
    saved = [t.detach().clone() for t in tensors]
    checkpoint.load_weights(release, module.model)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
