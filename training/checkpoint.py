"""Checkpoints with megatron-core's dist_checkpointing: any parallel layout saves, any layout loads.

Layout under the stage directory:
    checkpoints/iter_0000100/   one dist_checkpointing directory per save (model, optimizer, scheduler, RNG, data
                                position, the model config: resuming with another architecture is refused)
    checkpoints/iter_…/complete.json   written last, after every rank finished: the size and sha256 of every file of
                                the save (training/integrity.py)
    checkpoints/latest          the step of the newest *complete* save; written atomically after complete.json
    release/                    model weights only, for registration and evaluation; its own complete.json
A save that dies half-way never becomes `latest` (an asynchronous save hashes its files, writes `complete.json` and
`latest` in its finalize step, when every rank's background writer has finished). A checkpoint that has no
`complete.json`, or a file of another size than it records (a truncated file, a lost upload), is torn: loading skips
it with a warning and takes the newest complete older one, or starts fresh when there is none. A torn checkpoint is
never loaded.

Loading is deserialisation, and dist_checkpointing's is not safe on untrusted bytes. In megatron-core 0.16.1 with
torch 2.13 (checked in their source): `.metadata` is read with `pickle.load` (torch.distributed.checkpoint's
FileSystemReader.read_metadata); ShardedObjects (the RNG state here) travel as bytes inside the `*.distcp` files and
are read with `torch.load(weights_only=False)` (DefaultLoadPlanner.load_bytes), so either runs any code a crafted
file carries; tensors are read with `torch.load(weights_only=True)`, and `common.pt` with a bare `torch.load`, whose
default is `weights_only=True` unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set. So before anything reads a byte of the
chosen checkpoint (the architecture check included), every node verifies every file's sha256 against `complete.json`
and refuses, naming the file, a checkpoint whose bytes changed after the save or that holds a file the save did not
write: an IntegrityError, never a silent fall-back. `complete.json` is the trust anchor: see the README's "Trust
boundary".

Pruning keeps the newest `keep_last` complete checkpoints, the one `latest` names and the newest complete one, in
numeric step order; everything else (torn leftovers included) is removed, locally and in the object store.

With an `s3://` run root, `root` is the local mirror and `remote` its URI: after a save completes, each node's local
rank 0 uploads the files its ranks wrote, then rank 0 uploads `complete.json`, and only then the `latest` marker.
Resuming on a fresh machine downloads the checkpoint the remote marker names.
"""
from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training import integrity, retention, storage
from training.integrity import IntegrityError, torn_reason  # noqa: F401 - part of this module's API
from training.retention import LATEST

COMPLETE = integrity.MARKER
MODEL_CONFIG = "model_config"   # common-state key: the ModelConfig (model_dump) the checkpoint was trained with


def _node_leader() -> bool:
    """Local rank 0: uploads, downloads and hashes for the ranks of its node (they share its local disk)."""
    return integrity.node_leader()


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"checkpoint: warning: {message}", file=sys.stderr, flush=True)


def _saved_steps(root: Path) -> list[int]:
    return sorted(retention.steps(p.name for p in root.glob("iter_*") if p.is_dir()))


def latest_step(root: Path) -> int | None:
    """The step to resume from: the one the `latest` marker names if complete, else (with a warning) the newest
    complete checkpoint older than it; None for a fresh start. Rank 0 decides for every rank."""
    step = _choose_step(root) if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)
        step = box[0]
    return step


def _choose_step(root: Path) -> int | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    try:
        named = int(marker.read_text().strip())
    except ValueError:
        _warn(f"{marker} is unreadable; looking for the newest complete checkpoint")
        named = max(_saved_steps(root), default=-1)
    for step in reversed([s for s in _saved_steps(root) if s <= named]):
        reason = torn_reason(step_dir(root, step))
        if reason is None:
            if step != named:
                _warn(f"resuming from step {step}, the newest complete checkpoint before step {named}")
            return step
        _warn(f"skipping torn checkpoint: {reason}")
    if named >= 0 and not step_dir(root, named).is_dir():
        _warn(f"{marker} names step {named} but {step_dir(root, named)} does not exist")
    _warn("no complete checkpoint: starting fresh")
    return None


def _model_sharded_state_dict(model):
    """A model's sharded state dict; for a list of virtual-pipeline chunks, one entry per chunk. Tensors are keyed
    by global layer numbers either way, so any parallel layout loads what another saved."""
    from megatron.core import parallel_state

    if isinstance(model, list):
        return {f"chunk{i}": _model_sharded_state_dict(chunk) for i, chunk in enumerate(model)}
    return model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})


def rng_states() -> dict:
    """Every generator a step may draw from, as megatron-LM saves them: Python, NumPy, torch's CPU generator, the
    CUDA generator on GPUs, and megatron's tensor-parallel tracker (dropout under TP/SP and in experts)."""
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # NumPy's key array travels as a tensor. (Not required by the loader: this ShardedObject is read back with
    # torch.load(weights_only=False), which takes any object; see the module docstring. Kept: checkpoints have it so.)
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
              "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of `rng_states`. Checkpoints from before it saved only torch's CPU state: restore what is there."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(states["torch"])
    if "python" in states:
        random.setstate(states["python"])
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _rng_sharded_object():
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", rng_states(), (world,), (rank,), replica_id=0)


def _full_state_dict(model, optimizer, scheduler, common: dict, loading: bool) -> dict:
    state = {"model": _model_sharded_state_dict(model)}
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"], is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state.update(common)
    return state


def save(root: Path, step: int, model, optimizer, scheduler, common: dict, keep_last: int,
         remote: str | None = None, async_queue=None, on_complete=None) -> Path:
    """Save a full training checkpoint for `step`, then mark it latest and prune older ones (keep `keep_last`);
    then call `on_complete()` (every rank), if given.

    With `async_queue` (megatron-core's AsyncCallsQueue) a forked process writes the tensors while training goes
    on; everything after the write (complete.json, upload, the `latest` marker, pruning, `on_complete`) is a
    finalize function that runs when every rank calls `async_queue.maybe_finalize_async_calls` and all writers are
    done, so the marker still appears only after a complete save."""
    from megatron.core import dist_checkpointing

    target = step_dir(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)   # leftovers of a save that crashed half-way
        target.mkdir(parents=True)
    dist.barrier()
    state = _full_state_dict(model, optimizer, scheduler, common, loading=False)
    def complete() -> None:
        _mark_complete(root, target, step, keep_last, remote)
        if on_complete is not None:
            on_complete()

    if async_queue is None:
        dist_checkpointing.save(state, str(target))
        complete()
    else:
        request = dist_checkpointing.save(state, str(target), async_sharded_save=True)
        request.add_finalize_fn(complete)
        async_queue.schedule_async_request(request)
    return target


def _mark_complete(root: Path, target: Path, step: int, keep_last: int, remote: str | None) -> None:
    """After every rank wrote its files: hash and record them, upload, name the save `latest`, prune older saves."""
    dist.barrier()
    seal(target, step=step)
    if remote and _node_leader():
        storage.publish(target, exclude=(COMPLETE,))
    dist.barrier()
    if dist.get_rank() == 0:
        if remote:   # the marker after every node's files, `latest` after the marker
            storage.publish(target / COMPLETE)
            storage.write_text(storage.join(remote, LATEST), str(step))
        storage.write_text(str(root / LATEST), str(step))
    retention.prune(root, keep_last, remote)
    dist.barrier()


def seal(target: Path, **fields) -> None:
    """Write `target`'s complete marker once every rank's files are there, called by every rank: each node's local
    rank 0 hashes the files on its disk (on a shared filesystem each leader hashes them all), rank 0 merges the
    records and writes complete.json, the last file of the save."""
    listing = integrity.hash_tree(target) if _node_leader() else {}
    parts = [listing]
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, listing)
    if dist.get_rank() == 0:
        files: dict[str, dict] = {}
        for part in reversed(parts):   # rank 0's own record last: a file it sees is recorded as it sees it
            files.update(part)
        integrity.write_marker(target, files, **fields)
    dist.barrier()


def load(root: Path, model, optimizer, scheduler, remote: str | None = None, model_config=None) -> dict | None:
    """Restore the latest complete checkpoint into model/optimizer/scheduler/RNG; returns its common state.

    With `model_config` (a ModelConfig), a checkpoint that recorded a different architecture is refused before
    anything is loaded, naming the fields that differ."""
    from megatron.core import dist_checkpointing

    if remote:
        _fetch_latest(root, remote)
    step = latest_step(root)
    if step is None:
        return None
    # Every node checks every file's sha256 before anything unpickles a byte (the architecture check reads common.pt).
    integrity.verify_on_every_node(step_dir(root, step))
    if model_config is not None:
        check_architecture(step_dir(root, step), model_config)
    # A fresh optimizer has no state yet (no Adam moments, no step) to load into: create it, as megatron-LM does.
    # megatron-core 0.16's init_state_fn omits torch Adam's `step`, which the distributed optimizer's state_dict reads
    # when Transformer Engine / Apex are absent: add it (it is overwritten by the loaded value).
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner.init_state_fn(inner.optimizer, inner.config)
        for state in inner.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))
    template = _full_state_dict(model, optimizer, scheduler, {}, loading=True)
    template.pop("scheduler")
    loaded = dist_checkpointing.load(template, str(step_dir(root, step)))
    _load_model_state(model, loaded["model"])
    with torch.no_grad():   # the distributed optimizer copies into leaf tensors
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    restore_rng_states(loaded["rng_state"])
    return {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "scheduler", "rng_state")}


class ArchitectureMismatch(ValueError):
    """The checkpoint to resume from was trained with a different model architecture."""


def check_architecture(directory: Path, model_config) -> None:
    """Raise ArchitectureMismatch when the model config recorded in the checkpoint at `directory` differs from
    `model_config` in an architecture field (a checkpoint without a record is loaded unchecked, with a warning)."""
    from megatron.core import dist_checkpointing

    recorded = dist_checkpointing.load_common_state_dict(str(directory)).get(MODEL_CONFIG)
    if recorded is None:
        _warn(f"{directory.name} records no model config: cannot check it matches the configured architecture")
        return
    differences = model_config.architecture_differences(recorded)
    if differences:
        raise ArchitectureMismatch(f"cannot resume from {directory}: its model architecture differs from the "
                                   f"config ({'; '.join(differences)}). Use the checkpoint's values, or a new "
                                   f"run_root to train the new architecture from scratch.")


def _restore_adam_steps(optimizer) -> None:
    """Put the loaded Adam step count back into every parameter's state. Without TE/Apex, megatron-core 0.16's
    distributed optimizer saves torch Adam's per-parameter `step` in its param groups, but after loading the states
    keep the 0 that `init_state_fn` made: bias correction would restart and a resumed run would drift."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]))   # one tensor each: Adam adds to it in place


def _fetch_latest(root: Path, remote: str) -> None:
    """Bring the checkpoint the remote `latest` marker names into the local mirror (every node needs all files);
    when it is torn, the newest complete older one instead."""
    if _node_leader():
        marker = storage.read_text(storage.join(remote, LATEST))
        if marker is not None:
            step = int(marker.strip())
            remote_steps = sorted(set(retention.steps(storage.children(remote))) | {step})
            for candidate in reversed([s for s in remote_steps if s <= step]):
                try:
                    local = storage.fetch(storage.join(remote, step_dir(root, candidate).name))
                except storage.UnsafeKeyError:
                    raise   # a planted key is an attack on the mirror, not a torn save: stop, naming it
                except storage.StorageError as err:
                    _warn(f"cannot fetch checkpoint {candidate}: {err}")
                    continue
                if torn_reason(Path(local)) is None:
                    break
            storage.write_text(str(root / LATEST), str(step))
    dist.barrier()


def _load_model_state(model, state: dict) -> None:
    for i, chunk in enumerate(model if isinstance(model, list) else [model]):
        chunk.load_state_dict(state[f"chunk{i}"] if isinstance(model, list) else state)


def load_weights(release_dir: Path, model) -> None:
    """A release's weights (saved by any layout) into this rank's model, or its list of model chunks; every node
    verifies the release's files against its complete.json first (IntegrityError naming the file)."""
    from megatron.core import dist_checkpointing

    integrity.verify_on_every_node(release_dir)
    loaded = dist_checkpointing.load({"model": _model_sharded_state_dict(model)}, str(release_dir))
    _load_model_state(model, loaded["model"])


def save_release(target: Path, model, model_config) -> Path:
    """Model weights only (no optimizer) in dist_checkpointing format, the ModelConfig that reads them
    (seekflow_model.json), and last the complete marker with every file's sha256: what gets registered. Every rank
    calls it; each node's files stay on its disk (the caller uploads them, the marker last)."""
    from megatron.core import dist_checkpointing

    from training.model.release import write_model_config

    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": _model_sharded_state_dict(model)}, str(target))
    if dist.get_rank() == 0:
        write_model_config(target, model_config)
    dist.barrier()
    seal(target)
    return target
