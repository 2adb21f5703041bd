"""Reap what a sandboxed program leaves behind when no PID namespace does it for us (the sandbox pod).

A program can fork a child that calls `setsid()` and outlives its process group. The sandbox service makes itself a
child subreaper (PR_SET_CHILD_SUBREAPER), so such orphans are re-parented to it rather than to init; after each
program, every child of the service that is not a program still running is killed and reaped. Off (a no-op) unless
`become_subreaper()` was called: a training job or a test process has other children that must not be touched.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36
_lock = threading.Lock()
_active: set[int] = set()
_enabled = False


def become_subreaper() -> None:
    global _enabled
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    _enabled = True


@contextmanager
def starting():
    """Hold while starting a program: a sweep never runs between its fork and `track`."""
    with _lock:
        yield


def track(pid: int) -> None:
    _active.add(pid)


def untrack(pid: int) -> None:
    _active.discard(pid)


def _children() -> list[int]:
    me = str(os.getpid())
    pids = []
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def reap_orphans() -> int:
    """Kill and reap every child that is not a running program; returns how many."""
    if not _enabled:
        return 0
    with _lock:
        orphans = [pid for pid in _children() if pid not in _active]
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return len(orphans)
