"""Checkpoint writes (every device): the write-results queue without a spawned Manager process.

megatron-core's `FileSystemWriterAsync` (the `torch_dist` save path, synchronous and asynchronous alike) hands each
save's write results back through `_get_write_results_queue()`: a `multiprocessing.Manager().Queue()` started with
the *spawn* method on a process's first save. That is a fresh interpreter in every training process (~2 s before the
first checkpoint on 2 CPU cores), and a server process that nothing stops when its trainer is killed (SIGKILL, a
preempted pod): it outlives the job.

The queue only ever carries results from processes *forked* from the trainer: megatron's write workers, and the
fork-based `TemporalAsyncCaller` behind `AsyncCallsQueue()`, the one seekflow uses for `train.async_save` (not the
spawned persistent worker). A fork-context queue, created before those forks and inherited by them, does the same job
with no extra process. One difference needs care: a `multiprocessing.Queue` hands a put to a feeder thread, so a put
made in this very process (a synchronous save) may not be readable at once, and megatron reads it with
`get_nowait()`; `_ResultsQueue` waits for it instead.
"""
from __future__ import annotations

import multiprocessing

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose dist_checkpointing/strategies/filesystem_async.py this was checked against


class _ResultsQueue:
    """A fork-context `multiprocessing.Queue` whose `get_nowait()` waits for a put still being flushed."""

    FLUSH_S = 60   # a put of this process is in the pipe within milliseconds; this only bounds a broken writer

    def __init__(self):
        self._queue = multiprocessing.get_context("fork").Queue()

    def put(self, item) -> None:
        self._queue.put(item)

    def get(self, *args, **kwargs):
        return self._queue.get(*args, **kwargs)

    def get_nowait(self):
        return self._queue.get(timeout=self.FLUSH_S)   # raises queue.Empty, as get_nowait would, if nothing comes


@once
def apply() -> None:
    """Idempotent; imports megatron-core (on a CPU, after the CPU shim)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = None

    def _get_write_results_queue():
        nonlocal results
        if results is None:
            results = _ResultsQueue()
        return results

    filesystem_async._get_write_results_queue = _get_write_results_queue
