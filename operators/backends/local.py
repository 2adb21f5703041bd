"""The embedded default backend: the job runs as local processes (`torchrun` or `python`) on this machine.

Output is streamed line by line into the task log. The job gets its own process group, so `kill()` reaches torchrun
and every worker it spawned; and each job asks the kernel to SIGTERM it if the Airflow task process dies first
(PR_SET_PDEATHSIG), so a hard-killed worker leaves no orphans training in the background.
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


def _die_with_parent() -> None:   # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass   # not Linux: kill() still works, only the hard-crash safety net is missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBackend:
    def __init__(self, python: str = sys.executable, workdir: str | None = None, kill_grace_s: float = 15.0,
                 tail_lines: int = 40):
        self.python = python
        self.workdir = workdir
        self.kill_grace_s = kill_grace_s
        self.tail_lines = tail_lines
        self._proc: subprocess.Popen | None = None
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
        log(f"local backend: {' '.join(cmd)}")
        output = _OutputPump(log, self.tail_lines)
        try:
            with self._lock:
                if self._killed:
                    raise JobFailed(f"{spec.stage}: killed before it started")
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                              bufsize=1, cwd=self.workdir, env=env, start_new_session=True,
                                              preexec_fn=_die_with_parent)
            output.start(self._proc.stdout)
            returncode = self._proc.wait()
            # Processes the job left behind (say, children of a worker that crashed) still hold the output pipe
            # open and would run on unsupervised: they end with the job.
            _end_group(self._proc.pid, grace_s=2.0)
            output.join(timeout=30)
        finally:
            os.unlink(config_path)
        if self._killed:
            raise JobFailed(f"{spec.stage}: killed (exit status {returncode})")
        if returncode != 0:
            last = "\n".join(output.tail)
            raise JobFailed(f"{spec.stage} failed with exit status {returncode}; last output:\n{last}")
        return output.result

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """SIGTERM the job's process group, then SIGKILL whatever is left after the grace period."""
        with self._lock:
            self._killed = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _end_group(proc.pid, grace_s=self.kill_grace_s)   # start_new_session: the job leads its own group
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
