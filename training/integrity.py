"""The sha256 of every file of a checkpoint or release directory: recorded when it is saved, checked before anything
unpickles a byte of it (DESIGN rule 10: untrusted stays untrusted).

A saved directory ends with its complete marker, written last, once every rank's files are there:
    complete.json   {"files": {"<relative path>": {"size": <bytes>, "sha256": "<hex>"}, ...}, ...}
Two checks read it:
    torn_reason(dir)   cheap: the marker is there and every file it lists has its recorded size. What a crash or a
                       lost upload leaves fails it: the caller may skip the directory (resume takes an older one).
    verify_tree(dir)   complete: every file is hashed (in chunks, several files at once) and the directory is refused
                       with an IntegrityError naming the file when one differs from its record, when a file the
                       marker does not list is there (megatron reads `.metadata`, `common.pt`, `*.pt`, `*.distcp` by
                       name), when a listed one is missing or a symlink, or when the marker records no hashes.
The marker is only as trustworthy as whoever wrote it: anyone who can write both the bytes and the marker (the
object store, MLflow's artifact store) can plant both. A registered version therefore also carries the sha256 of its
marker as a version tag (`marker_digest`), which training.registry checks after a download. Nothing here imports
torch, except `verify_on_every_node`, which only talks to the other ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARKER = "complete.json"
CHUNK = 8 << 20            # bytes read at a time: a multi-GB shard never sits in memory whole
_VERIFIED: dict[str, tuple] = {}   # directory -> the stat of every file when it last verified (see verify_tree)


class IntegrityError(RuntimeError):
    """A directory's bytes are not the ones its trusted record lists (the message names the file): not loaded."""

    permanent = True   # bytes that fail their hashes stay failed: the task is not retried (training/__main__.py)


def sha256_file(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _entries(directory: Path) -> list[str]:
    """Relative paths of every file (and symlink) under `directory`, sorted; not the marker, its temporary file, nor
    training.storage's in-progress downloads (`.<name>.<pid>.part`, which no loader reads)."""
    skip = {MARKER, MARKER + ".tmp"}
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() not in skip
                  and not (p.name.startswith(".") and p.name.endswith(".part")))


def _hash_all(directory: Path, names: list[str]) -> dict[str, str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))   # hashlib releases the GIL on large buffers
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda name: sha256_file(directory / name), names)))


def hash_tree(directory: str | Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for every file under `directory` except the marker: what a save records."""
    directory = Path(directory)
    names = _entries(directory)
    hashes = _hash_all(directory, names)
    return {name: {"size": (directory / name).stat().st_size, "sha256": hashes[name]} for name in names}


def write_marker(directory: str | Path, files: dict[str, dict], **fields) -> None:
    """The complete marker, atomically (a reader sees none or all of it). Call it last, after every file is written."""
    directory = Path(directory)
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps({**fields, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, directory / MARKER)


def seal(directory: str | Path, **fields) -> dict[str, dict]:
    """Hash every file of a finished single-writer save and write its marker; returns what it recorded."""
    files = hash_tree(directory)
    write_marker(directory, files, **fields)
    return files


def read_marker(directory: Path) -> dict:
    record = directory / MARKER
    if not record.is_file():
        raise IntegrityError(f"{directory} has no {MARKER}: torn (its save never finished) or not written by "
                             f"seekflow; refusing to load it")
    try:
        marker = json.loads(record.read_text())
        if not isinstance(marker["files"], dict):
            raise TypeError("'files' is not a mapping")
        return marker
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{record} is unreadable ({err}); refusing to load {directory}") from None


def marker_digest(directory: str | Path) -> str:
    """The sha256 of the directory's marker file: one value that pins every file's hash (a registry tag)."""
    directory = Path(directory)
    read_marker(directory)
    return sha256_file(directory / MARKER)


def _recorded_size(entry) -> int | None:
    if isinstance(entry, int):   # markers from before hashes were recorded list sizes only
        return entry
    return entry.get("size") if isinstance(entry, dict) else None


def torn_reason(directory: str | Path) -> str | None:
    """Why the directory is torn (no marker, or a file it lists is missing or of another size), or None when not.
    Sizes only: `verify_tree` is the check before a load."""
    directory = Path(directory)
    try:
        files = read_marker(directory)["files"]
    except IntegrityError:
        if not (directory / MARKER).is_file():
            return f"{directory.name} has no {MARKER} (its save never finished)"
        return f"{directory.name}/{MARKER} is unreadable"
    for name, entry in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{directory.name}/{name} is missing"
        if path.stat().st_size != _recorded_size(entry):
            return f"{directory.name}/{name} has {path.stat().st_size} bytes, {_recorded_size(entry)} when saved " \
                   f"(truncated?)"
    return None


def _stat_key(directory: Path, names: list[str], expected: dict[str, str]) -> tuple:
    """Identity of every file as the kernel sees it: any write changes its ctime, which no caller can set back."""
    stats = []
    for name in [*names, MARKER]:
        if (directory / name).exists():
            s = (directory / name).lstat()
            stats.append((name, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))
    return tuple(stats), tuple(sorted(expected.items()))


def verify_tree(directory: str | Path, expected: dict[str, str] | None = None) -> None:
    """Refuse `directory` (IntegrityError naming the file) unless its files are exactly those `expected` lists
    ({relative path: sha256}; default: its own marker's) with exactly those hashes.

    A directory that verified in this process and whose files have not been written since (same inode, size, mtime
    and ctime) is not hashed again: evaluate, export and init_checkpoint check once when they resolve a release and
    again right before loading it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IntegrityError(f"{directory} does not exist")
    if expected is None:
        expected = {}
        for name, entry in read_marker(directory)["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
                raise IntegrityError(f"{directory / MARKER} records no sha256 for {name} (saved before checkpoints "
                                     f"recorded hashes, or not by seekflow): cannot verify it; refusing to load")
            expected[name] = entry["sha256"]
    present = _entries(directory)
    for name in present:
        if name not in expected:
            raise IntegrityError(f"{directory / name} is not listed in {MARKER}: the save did not write it; "
                                 f"refusing to load {directory}")
        if (directory / name).is_symlink():
            raise IntegrityError(f"{directory / name} is a symlink; refusing to load {directory}")
    for name in expected:
        if name not in present:
            raise IntegrityError(f"{directory / name} is missing; refusing to load {directory}")
    key = _stat_key(directory, present, expected)
    if _VERIFIED.get(str(directory.resolve())) == key:
        return
    actual = _hash_all(directory, present)
    for name in present:
        if actual[name] != expected[name]:
            raise IntegrityError(f"{directory / name}: sha256 {actual[name][:16]}… differs from "
                                 f"{expected[name][:16]}… recorded at save: the file changed after it was saved "
                                 f"(tampered or corrupted); refusing to load {directory}")
    _VERIFIED[str(directory.resolve())] = key


def node_leader() -> bool:
    """Local rank 0: the rank that reads and writes for the ranks of its node (they share its local disk)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def verify_on_every_node(directory: str | Path) -> None:
    """`verify_tree` for a distributed job, called by every rank: each node's local rank 0 hashes the copy on its
    own disk; every rank raises the same IntegrityError when any node's copy fails."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        verify_tree(directory)
        return
    problem = None
    if node_leader():
        try:
            verify_tree(directory)
        except IntegrityError as err:
            problem = str(err)
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for problem in problems:
        if problem is not None:
            raise IntegrityError(problem)
