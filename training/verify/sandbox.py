"""Run untrusted Python (model-written code) where it can reach nothing, and say how it ended.

Each program runs isolated (`training.verify.isolation`: bubblewrap namespaces locally, the sandbox pod on
Kubernetes) under kernel limits its trusted launcher sets before the program starts:
    RLIMIT_AS     address space: an allocation past it raises MemoryError instead of swapping the host
    RLIMIT_CPU    CPU seconds: the kernel sends SIGXCPU, then SIGKILL one second later
    RLIMIT_FSIZE  bytes per written file; the scratch tmpfs is size-limited as a whole
    RLIMIT_NPROC  processes: a fork bomb gets EAGAIN
    RLIMIT_CORE   0: no core files
The parent reads stdout and stderr from pipes, never from files the program could replace (a symlink to /dev/zero
makes a file reader read forever), keeps at most `output_kb` of them and kills the program once it writes more. It
enforces wall time, and when it returns nothing the program started is still running.

`run_many` sends the programs to the sandbox service (`training.verify.service`) when $SEEKFLOW_SANDBOX_URL is set
(a training job on Kubernetes), else runs them here.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from training.verify import isolation as iso
from training.verify import reaper
from training.verify.spec import Limits, Outcome, Status

TAIL_CHARS = 2000
SANDBOX_URL_ENV = "SEEKFLOW_SANDBOX_URL"
ISOLATION_ENV = "SEEKFLOW_SANDBOX_ISOLATION"
_READ_CHUNK = 65536


def default_isolation() -> str:
    return os.environ.get(ISOLATION_ENV, "namespaces")


def run_python(source: str, limits: Limits = Limits(), isolation: str | None = None) -> Outcome:
    """Execute `source` as a script under `limits`. Never raises for anything the program does; raises
    `SandboxUnavailable` when this host cannot sandbox at all (nothing runs unsandboxed)."""
    isolation = isolation or default_isolation()
    if isolation not in iso.LAUNCHERS:
        raise ValueError(f"sandbox isolation must be one of {sorted(iso.LAUNCHERS)}, not {isolation!r}")
    iso.preflight(isolation)
    started = time.monotonic()
    launch = iso.LAUNCHERS[isolation](source, limits)
    try:
        try:
            env = launch.popen.pop("env", {})
            with reaper.starting():
                proc = subprocess.Popen(launch.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                        **launch.popen)
                reaper.track(proc.pid)
        except OSError as exc:
            return Outcome("error", f"could not start the sandbox: {exc}", time.monotonic() - started)
        ended, stderr = _watch(proc, limits, started)
    finally:
        launch.close()
    elapsed = time.monotonic() - started
    tail = stderr[-TAIL_CHARS:].decode("utf-8", "replace")
    if ended == "wall":
        return Outcome("timeout", f"wall time limit ({limits.wall_s:g} s) exceeded", elapsed, tail)
    if ended == "output":
        return Outcome("failed", f"output limit ({limits.output_kb} KiB) exceeded", elapsed, tail)
    code = proc.returncode
    if isolation == "namespaces" and code > 128:   # bwrap reports a signal death as 128 + the signal
        code = 128 - code
    if isolation == "namespaces" and code == 1 and tail.startswith("bwrap:"):
        return Outcome("error", f"the sandbox failed: {tail.strip()[:300]}", elapsed, tail)
    status, reason = classify(code, tail, limits)
    return Outcome(status, reason, elapsed, tail)


def _watch(proc: subprocess.Popen, limits: Limits, started: float) -> tuple[str, bytes]:
    """Read both pipes until the program exits, writes past its output allowance, or runs out of wall time;
    then kill whatever is left. Returns (how it ended: "exit" | "output" | "wall", the kept stderr)."""
    budget = limits.output_kb << 10
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    total = 0
    ended = "exit"
    with selectors.DefaultSelector() as sel:
        for pipe in kept:
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = started + limits.wall_s - time.monotonic()
            if left <= 0:
                ended = "wall"
                break
            for key, _ in sel.select(timeout=min(left, 0.25)):
                chunk = os.read(key.fileobj.fileno(), _READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                total += len(chunk)
                kept[key.fileobj] += chunk[: max(0, budget - len(kept[key.fileobj]))]
            if total > budget:
                ended = "output"
                break
            if proc.poll() is not None and not sel.select(timeout=0):
                break   # exited, and nothing more is waiting (a leftover child holding the pipes is killed below)
    _kill(proc)
    for pipe in kept:
        pipe.close()
    return ended, bytes(kept[proc.stderr])


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the program's session (bwrap and everything in its PID namespace; in a pod, the program's process
    group), wait for it, and reap any descendant that escaped the group and was re-parented to us."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    reaper.untrack(proc.pid)
    reaper.reap_orphans()


def classify(code: int, stderr_tail: str, limits: Limits) -> tuple[Status, str]:
    """(status, reason) for a program that exited by itself with `code` (negative: killed by that signal)."""
    if code == 0:
        return "passed", "ok"
    error = last_error_line(stderr_tail)
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and not error.startswith("MemoryError"):
        # SIGKILL also ends a program the OOM killer chose; call it CPU time only when nothing says memory.
        return "timeout", f"CPU time limit ({limits.cpu_s} s) exceeded"
    # Python ignores SIGXFSZ, so a capped file surfaces as OSError EFBIG ("File too large").
    if code == -signal.SIGXFSZ or "File too large" in error:
        return "failed", f"file size limit ({limits.output_kb} KiB per file) exceeded"
    if "No space left on device" in error:
        return "failed", f"scratch space limit ({limits.scratch_mb} MiB) exceeded"
    if error.startswith("MemoryError") or "Cannot allocate memory" in error:
        return "failed", f"memory limit ({limits.memory_mb} MiB) exceeded: {error}"
    if "Resource temporarily unavailable" in error and ("fork" in stderr_tail or "spawn" in stderr_tail):
        return "failed", f"process limit ({limits.processes}) reached: {error}"
    if code < 0:
        return "failed", f"killed by {signal.Signals(-code).name}"
    return "failed", error or f"exit status {code}"


def last_error_line(stderr_tail: str) -> str:
    """The exception line of a traceback, e.g. `AssertionError` or `NameError: name 'x' is not defined`."""
    lines = [line.strip() for line in stderr_tail.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_many(sources: Iterable[str], limits: Limits = Limits(), workers: int = 2,
             sandbox_url: str | None = None) -> list[Outcome]:
    """`run_python` over many programs, `workers` at a time, in order: here, or in the sandbox service at
    `sandbox_url` (default $SEEKFLOW_SANDBOX_URL)."""
    sources = list(sources)
    url = sandbox_url or os.environ.get(SANDBOX_URL_ENV)
    if url:
        from training.verify.remote import run_remote

        return run_remote(url, sources, limits)
    if sources:
        iso.preflight(default_isolation())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
