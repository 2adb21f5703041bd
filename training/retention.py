"""Which checkpoint saves to keep: pruning after each complete save (training/checkpoint.py), locally and in the
object store.

A save is kept when it is one of the newest `keep_last` complete ones (a `complete.json` marker: the save finished),
when `latest` names it (even torn: what resume reads first is never deleted under it), or when it is the newest
complete one. Everything else goes, torn leftovers of crashed saves included. Steps are compared as numbers, never
as directory names: `iter_10000000` is newer than `iter_9999999`, and `iter_100` is step 100.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

from training import storage
from training.integrity import MARKER, node_leader

LATEST = "latest"   # the file naming the step to resume from, beside the iter_* directories


def steps(names: Iterable[str]) -> dict[int, list[str]]:
    """step -> the `iter_<digits>` names among `names` that hold it (other names are ignored)."""
    found: dict[int, list[str]] = {}
    for name in names:
        suffix = name[len("iter_"):]
        if name.startswith("iter_") and suffix.isdigit():
            found.setdefault(int(suffix), []).append(name)
    return found


def retained(saved: Iterable[int], complete: Iterable[int], latest: int | None, keep_last: int) -> set[int]:
    """The steps of `saved` that pruning keeps (see the module docstring); `complete`: those with a marker."""
    saved = set(saved)
    done = sorted(set(complete) & saved)
    keep = set(done[-max(keep_last, 1):])   # the newest complete one is always among them
    if latest is not None and latest in saved:
        keep.add(latest)
    return keep


def marked_step(text: str | None) -> int | None:
    """The step a `latest` marker's text names; None when there is none or it is unreadable."""
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def prune(root: Path, keep_last: int, remote: str | None) -> None:
    """Remove the saves `retained` does not keep, called by every rank (or by one process without torch.distributed).
    Rank 0 decides for the local directory from the markers it holds and every node's local rank 0 removes those
    names; rank 0 prunes the object store from its listing there, which also holds saves of earlier pods."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    doomed: list = [[]]
    if rank == 0:
        local = steps(p.name for p in root.glob("iter_*") if p.is_dir())
        complete = [s for s, names in local.items() if any((root / n / MARKER).is_file() for n in names)]
        keep = retained(local, complete, marked_step(storage.read_text(str(root / LATEST))), keep_last)
        doomed = [sorted(n for s, names in local.items() if s not in keep for n in names)]
    if distributed and dist.get_world_size() > 1:
        dist.broadcast_object_list(doomed, src=0)
    if node_leader():
        for name in doomed[0]:
            shutil.rmtree(root / name, ignore_errors=True)
    if remote and rank == 0:
        saved = steps(storage.children(remote))
        complete = [s for s, names in saved.items()
                    if any(storage.exists(storage.join(remote, n, MARKER)) for n in names)]
        keep = retained(saved, complete, marked_step(storage.read_text(storage.join(remote, LATEST))), keep_last)
        for step in sorted(set(saved) - keep):
            for name in saved[step]:
                storage.delete(storage.join(remote, name))
