"""The embedded default backend: the job runs as local processes (`torchrun` or `python`) on this machine.

Output is streamed line by line into the task log. The job gets its own process group, so `kill()` reaches torchrun
and every worker it spawned; and each job asks the kernel to SIGTERM it if the Airflow task process dies first
(PR_SET_PDEATHSIG), so a hard-killed worker leaves no orphans training in the background. Jobs run at nice 10, below
Airflow's own processes.
"""
from __future__ import annotations

import collections
import ctypes
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from operators.backends.base import JobFailed, JobSpec, parse_result

_PR_SET_PDEATHSIG = 1
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"    # the names a Kubernetes Indexed Job's pods see (k8s_render sets the
SHARD_COUNT_ENV = "SEEKFLOW_NUM_SHARDS"     # count; Kubernetes sets the index)


def _child_setup(niceness: int) -> Callable[[], None]:
    """What runs in the child between fork and exec: lower its priority by `niceness`, and ask the kernel to
    SIGTERM it if the Airflow task process dies first."""
    def setup() -> None:
        if niceness:
            os.nice(niceness)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass   # not Linux: kill() still works, only the hard-crash safety net is missing
    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBackend:
    def __init__(self, python: str = sys.executable, workdir: str | None = None, kill_grace_s: float = 15.0,
                 tail_lines: int = 40, niceness: int = 10):
        self.python = python
        # Jobs saturate the cores; below the control plane's priority, Airflow's api-server and scheduler keep
        # answering (on 2 cores at equal priority CI saw the api-server stall for 30-40 s). Idle cores are still
        # the job's: nice only orders who waits.
        self.niceness = niceness
        self.workdir = workdir
        self.kill_grace_s = kill_grace_s
        self.tail_lines = tail_lines
        self._procs: list[subprocess.Popen] = []
        self.max_parallel_shards = os.cpu_count() or 1
        self._lock = threading.Lock()
        self._killed = False

    def command(self, spec: JobSpec, config_path: str) -> list[str]:
        if spec.nodes != 1:
            raise ValueError(f"the local backend runs on one machine; {spec.stage} asks for {spec.nodes} nodes")
        if spec.launcher == "python":
            return [self.python, *spec.training_args(config_path)]
        return [self.python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={spec.procs_per_node}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--max-restarts=0",
                *spec.training_args(config_path)]

    def run(self, spec: JobSpec, log: Callable[[str], None]) -> dict:
        with tempfile.NamedTemporaryFile("w", prefix=f"seekflow-{spec.stage}-", suffix=".yaml", delete=False) as f:
            f.write(spec.config_yaml)
            config_path = f.name
        cmd = self.command(spec, config_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        try:
            if spec.sharded:
                return self._run_shards(spec, cmd, env, log)
            log(f"local backend: {' '.join(cmd)}")
            return self._run_process(spec.stage, cmd, env, log)
        finally:
            os.unlink(config_path)

    def _run_shards(self, spec: JobSpec, cmd: list[str], env: dict, log: Callable[[str], None]) -> dict:
        """Shards as concurrent processes, as an Indexed Job runs pods: each gets JOB_COMPLETION_INDEX and
        SEEKFLOW_NUM_SHARDS; at most one per CPU core runs at a time. Any failed shard fails the job."""
        parallelism = max(1, min(spec.shards, self.max_parallel_shards))
        log(f"local backend: {spec.shards} shards, {parallelism} at a time: {' '.join(cmd)}")
        pending = list(range(spec.shards))
        results: dict[int, dict] = {}
        errors: dict[int, JobFailed] = {}
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not pending or errors:
                        return
                    index = pending.pop(0)
                shard_env = {**env, SHARD_INDEX_ENV: str(index), SHARD_COUNT_ENV: str(spec.shards)}
                try:
                    label = f"{spec.stage}: shard {index} of {spec.shards}"
                    results[index] = self._run_process(label, cmd, shard_env,
                                                       lambda line, i=index: log(f"[shard {i}] {line}"))
                except JobFailed as err:
                    with lock:
                        errors[index] = err

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallelism)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[min(errors)]
        return {"shards": spec.shards, "results": [results[i] for i in range(spec.shards)]}

    def _run_process(self, label: str, cmd: list[str], env: dict, log: Callable[[str], None]) -> dict:
        output = _OutputPump(log, self.tail_lines)
        with self._lock:
            if self._killed:
                raise JobFailed(f"{label}: killed before it started")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    cwd=self.workdir, env=env, start_new_session=True,
                                    preexec_fn=_child_setup(self.niceness))
            self._procs.append(proc)
        output.start(proc.stdout)
        returncode = proc.wait()
        # Processes the job left behind (say, children of a worker that crashed) still hold the output pipe open
        # and would run on unsupervised: they end with the job.
        _end_group(proc.pid, grace_s=2.0)
        output.join(timeout=30)
        if self._killed:
            raise JobFailed(f"{label}: killed (exit status {returncode})")
        if returncode != 0:
            last = "\n".join(output.tail)
            raise JobFailed(f"{label} failed with exit status {returncode}; last output:\n{last}")
        return output.result

    @property
    def pid(self) -> int | None:
        """The most recently started process (the job's torchrun or python; the last shard started)."""
        return self._procs[-1].pid if self._procs else None

    def kill(self) -> None:
        """SIGTERM every process group this job started, then SIGKILL whatever is left after the grace period."""
        with self._lock:
            self._killed = True
            procs = list(self._procs)
        live = [p for p in procs if p.poll() is None]
        threads = [threading.Thread(target=_end_group, args=(p.pid, self.kill_grace_s)) for p in live]
        for thread in threads:   # start_new_session: each process leads its own group; end them all at once
            thread.start()
        for thread in threads:
            thread.join()
        for proc in live:
            proc.wait()


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM every process in the group, then SIGKILL whatever is still there after `grace_s`."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group? killpg(pgid, 0) would also count zombies."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


class _OutputPump:
    """Streams the job's output into the task log on a thread; keeps the last lines and the stage's result."""

    def __init__(self, log: Callable[[str], None], tail_lines: int):
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.result: dict = {}
        self._thread: threading.Thread | None = None

    def start(self, stream) -> None:
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.log(line)
            self.tail.append(line)
            self.result = parse_result(line) or self.result

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
