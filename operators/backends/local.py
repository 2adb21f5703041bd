"""The embedded default backend: the job runs as local processes (`torchrun` or `python`) on this machine.

Output is streamed line by line into the task log. The job gets its own process group, so `kill()` reaches torchrun
and every worker it spawned; and each job asks the kernel to SIGTERM it if the Airflow task process dies first
(PR_SET_PDEATHSIG), so a hard-killed worker leaves no orphans training in the background.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
        result: dict = {}
        tail: collections.deque[str] = collections.deque(maxlen=self.tail_lines)
        try:
            with self._lock:
                if self._killed:
                    raise JobFailed(f"{spec.stage}: killed before it started")
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                              bufsize=1, cwd=self.workdir, env=env, start_new_session=True,
                                              preexec_fn=_die_with_parent)
            for line in self._proc.stdout:
                line = line.rstrip("\n")
                log(line)
                tail.append(line)
                result = parse_result(line) or result
            returncode = self._proc.wait()
        finally:
            os.unlink(config_path)
        if self._killed:
            raise JobFailed(f"{spec.stage}: killed (exit status {returncode})")
        if returncode != 0:
            last = "\n".join(tail)
            raise JobFailed(f"{spec.stage} failed with exit status {returncode}; last output:\n{last}")
        return result

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
        pgid = proc.pid   # start_new_session: the job leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)   # stragglers in the group (workers that ignored SIGTERM)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
