"""Checkpoints with megatron-core's dist_checkpointing: any parallel layout saves, any layout loads.

Layout under the stage directory:
    checkpoints/iter_0000100/   one dist_checkpointing directory per save (model, optimizer, scheduler, RNG, data position)
    checkpoints/latest          the step of the newest *complete* save; written atomically after every rank finished
    release/                    model weights only, for registration and evaluation
A save that dies half-way never becomes `latest`, so a torn checkpoint is never loaded.

With an `s3://` run root, `root` is the local mirror and `remote` its URI: after a save completes, each node's local
rank 0 uploads the files its ranks wrote, and only then does rank 0 upload the `latest` marker. Resuming on a fresh
machine downloads the checkpoint the remote marker names.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from training import storage

LATEST = "latest"


def _node_leader() -> bool:
    """Local rank 0: uploads and downloads for the ranks of its node (they share its local disk)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    marker = root / LATEST
    if not marker.is_file():
        return None
    step = int(marker.read_text().strip())
    if not (step_dir(root, step) / "metadata.json").is_file():
        raise RuntimeError(f"{marker} names step {step} but {step_dir(root, step)} is incomplete")
    return step


def _model_sharded_state_dict(model):
    from megatron.core import parallel_state

    return model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})


def _rng_sharded_object():
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", {"torch": torch.get_rng_state()}, (world,), (rank,), replica_id=0)


def _full_state_dict(model, optimizer, scheduler, common: dict, loading: bool) -> dict:
    state = {"model": _model_sharded_state_dict(model)}
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"], is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    state["scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state.update(common)
    return state


def save(root: Path, step: int, model, optimizer, scheduler, common: dict, keep_last: int,
         remote: str | None = None) -> Path:
    """Save a full training checkpoint for `step`, then mark it latest and prune older ones (keep `keep_last`)."""
    from megatron.core import dist_checkpointing

    target = step_dir(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)   # leftovers of a save that crashed half-way
        target.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_full_state_dict(model, optimizer, scheduler, common, loading=False), str(target))
    dist.barrier()
    if remote and _node_leader():
        storage.publish(target)
    dist.barrier()
    if dist.get_rank() == 0:
        if remote:
            storage.write_text(storage.join(remote, LATEST), str(step))
        storage.write_text(str(root / LATEST), str(step))
    if _node_leader():
        saved = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in saved[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if remote and dist.get_rank() == 0:   # the object store also holds saves of earlier pods
        for old in [name for name in storage.children(remote) if name.startswith("iter_")][:-keep_last]:
            storage.delete(storage.join(remote, old))
    dist.barrier()
    return target


def load(root: Path, model, optimizer, scheduler, remote: str | None = None) -> dict | None:
    """Restore the latest complete checkpoint into model/optimizer/scheduler/RNG; returns its common state."""
    from megatron.core import dist_checkpointing

    if remote:
        _fetch_latest(root, remote)
    step = latest_step(root)
    if step is None:
        return None
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
    model.load_state_dict(loaded["model"])
    with torch.no_grad():   # the distributed optimizer copies into leaf tensors
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded["rng_state"]
    torch.set_rng_state(rng["torch"])
    return {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "scheduler", "rng_state")}


def _fetch_latest(root: Path, remote: str) -> None:
    """Bring the checkpoint the remote `latest` marker names into the local mirror (every node needs all files)."""
    if _node_leader():
        marker = storage.read_text(storage.join(remote, LATEST))
        if marker is not None:
            step = int(marker.strip())
            storage.fetch(storage.join(remote, step_dir(root, step).name))
            storage.write_text(str(root / LATEST), str(step))
    dist.barrier()


def save_release(target: Path, model) -> Path:
    """Model weights only (no optimizer), in dist_checkpointing format: what gets registered."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": _model_sharded_state_dict(model)}, str(target))
    dist.barrier()
    return target
