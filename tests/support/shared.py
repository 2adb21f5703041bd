"""Artifacts built once per test run and shared by every pytest-xdist worker: a file lock around the build, a
`.done` marker written last. A build that fails half-way is removed and retried by the next test that asks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock


def shared_root(tmp_path_factory) -> Path:
    """The folder every worker of this run sees: the parent of the worker's own base temp under xdist."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


def shared_artifact(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, built by `build(folder)` by whichever worker asks first; the others wait for it."""
    target = shared_root(tmp_path_factory) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not (target / ".done").is_file():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            try:
                build(target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            (target / ".done").touch()
    return target
