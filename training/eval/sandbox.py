"""Run untrusted Python (model-written code) in a child process with hard limits, and say how it ended.

The child is a fresh `python -I -S -B` (isolated: no PYTHON* variables, no user or site packages, no .pyc writes) in
its own session and process group, with a throwaway working directory, stdin at EOF (/dev/null), a minimal
environment, and stdout/stderr going to size-capped files in that directory. Before the program runs, a small
trusted launcher sets kernel limits on itself with `resource.setrlimit`:
    RLIMIT_AS     address space: an allocation past it raises MemoryError instead of swapping the host
    RLIMIT_CPU    CPU seconds: the kernel sends SIGXCPU, then SIGKILL one second later
    RLIMIT_FSIZE  bytes per written file: a runaway print loop dies with SIGXFSZ instead of filling the disk
    RLIMIT_CORE   0: no core files
The parent enforces wall time and kills the whole process group on timeout, and after every run (a program that
forks a background child leaves nothing behind). The limits are set in the launcher rather than via `preexec_fn`
because `preexec_fn` is unsafe with threads, and `run_many` runs programs from a thread pool.
Not covered: network access and the filesystem outside the working directory (that needs namespaces or a container;
on Kubernetes, run the evaluate job in a pod without egress).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal

Status = Literal["passed", "failed", "timeout", "error"]

_LAUNCHER = """
import resource, runpy, sys
mem, cpu, fsize = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TAIL_CHARS = 2000


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    output_kb: int = 1024      # per file the program writes, stdout and stderr included


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str                # "ok", or why it failed / timed out / could not run
    seconds: float
    stderr_tail: str = ""

    def record(self) -> dict:
        return asdict(self)


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Execute `source` as a script under `limits`; never raises for anything the program does."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seekflow-sandbox-") as work:
        work_dir = Path(work)
        (work_dir / "program.py").write_text(source)
        argv = [sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER, str(limits.memory_mb << 20), str(limits.cpu_s),
                str(limits.output_kb << 10), "program.py"]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        try:
            with open(work_dir / "stdout", "wb") as out, open(work_dir / "stderr", "wb") as err:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
        except OSError as exc:
            return Outcome("error", f"could not start the sandbox: {exc}", time.monotonic() - started)
        try:
            code = proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        if timed_out:
            code = proc.wait()
        elapsed = time.monotonic() - started
        tail = (work_dir / "stderr").read_bytes()[-TAIL_CHARS:].decode("utf-8", "replace")
    if timed_out:
        return Outcome("timeout", f"wall time limit ({limits.wall_s:g} s) exceeded", elapsed, tail)
    status, reason = classify(code, tail, limits)
    return Outcome(status, reason, elapsed, tail)


def classify(code: int, stderr_tail: str, limits: Limits) -> tuple[Status, str]:
    """(status, reason) for a child that exited by itself with `code` (negative: killed by that signal)."""
    if code == 0:
        return "passed", "ok"
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and _looks_cpu_bound(stderr_tail):
        return "timeout", f"CPU time limit ({limits.cpu_s} s) exceeded"
    error = last_error_line(stderr_tail)
    # Python ignores SIGXFSZ, so a capped file surfaces as OSError EFBIG ("File too large").
    if code == -signal.SIGXFSZ or "File too large" in error:
        return "failed", f"output limit ({limits.output_kb} KiB per file) exceeded"
    if error.startswith("MemoryError") or "Cannot allocate memory" in error:
        return "failed", f"memory limit ({limits.memory_mb} MiB) exceeded: {error}"
    if code < 0:
        return "failed", f"killed by {signal.Signals(-code).name}"
    return "failed", error or f"exit status {code}"


def _looks_cpu_bound(stderr_tail: str) -> bool:
    # SIGKILL also ends a program killed by the kernel's OOM killer; only call it CPU time when nothing says memory.
    return not last_error_line(stderr_tail).startswith("MemoryError")


def last_error_line(stderr_tail: str) -> str:
    """The exception line of a traceback, e.g. `AssertionError` or `NameError: name 'x' is not defined`."""
    lines = [line.strip() for line in stderr_tail.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(sources: Iterable[str], limits: Limits = Limits(), workers: int = 2) -> list[Outcome]:
    """`run_python` over many programs, `workers` at a time (threads only wait on child processes), in order."""
    sources = list(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
