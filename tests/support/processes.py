"""Fresh processes for megatron-core work (its CPU shim and parallel state are process-global), and loopback ports."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading

REPO = pathlib.Path(__file__).resolve().parents[2]


def torchrun(nproc: int) -> list[str]:
    """Interpreter arguments that launch `nproc` local ranks: `[sys.executable, *torchrun(2), script, ...]`.
    --standalone: the rendezvous binds a free port itself (torchrun's default, 29500, is one port for every xdist
    worker)."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_running(text: str) -> list[int]:
    """The processes whose command line holds `text` (how a sandbox test finds what a program left running)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def repo_env(**extra: str) -> dict:
    """This process's environment with the repository on PYTHONPATH, for `python -m training` and probe scripts."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_probe(test_file: str) -> dict:
    """Run `test_file` as a script with the argument `probe` in a fresh process (see `run_python`) and return the
    last JSON object it printed."""
    out = run_python(str(pathlib.Path(test_file).resolve()), "probe", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def kill_after(cmd: list[str], line: str, log) -> int:
    """Start `cmd` in its own session, SIGKILL its whole process group once `line` is in its output (written to
    `log`); the exit code. The job dies as on a lost node: no clean shutdown, no final save."""
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=repo_env(),
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while line not in pathlib.Path(log).read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def run_training(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -W ignore -m training ...` in a fresh process (see `run_python`)."""
    return run_python("-m", "training", *args, env=env, timeout=timeout)


def run_python(*argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -W ignore ARGV` (`-m module ...` or `script.py ...`) in the repository, with this environment plus
    `env`, as a child forked from this test process's zygote (tests/support/zygote.py): the isolation of a new
    interpreter, without paying for its imports each time."""
    return _zygote().run(list(argv), repo_env(**(env or {})), timeout)


class _Zygote:
    """The client side of tests/support/zygote.py: one zygote per test process, started at first use."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "tests.support.zygote"], cwd=REPO,
                                     env=repo_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        assert ready.startswith('{"ready"'), f"the zygote did not start: {ready!r}"
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.waiting: dict[str, queue.Queue] = {}
        threading.Thread(target=self._read_answers, daemon=True).start()

    def _read_answers(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            self.waiting[message["id"]].put(message)
        for answers in list(self.waiting.values()):   # the zygote died: nobody will answer these
            answers.put({"rc": None})

    def run(self, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-W", "ignore", *argv]   # what the child stands for
        request_id, answers = str(next(self.ids)), queue.Queue()
        self.waiting[request_id] = answers
        with tempfile.TemporaryDirectory(prefix="seekflow-run-") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            with self.lock:
                self.proc.stdin.write(json.dumps({"id": request_id, "argv": argv, "env": env, "cwd": str(REPO),
                                                  "out": out, "err": err}) + "\n")
                self.proc.stdin.flush()
            try:
                pid = answers.get(timeout=60)["pid"]
                try:
                    rc = answers.get(timeout=timeout)["rc"]
                except queue.Empty:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    answers.get(timeout=60)
                    raise subprocess.TimeoutExpired(command, timeout, _read(out), _read(err)) from None
            finally:
                del self.waiting[request_id]
            assert rc is not None, f"the zygote died while running {command}"
            return subprocess.CompletedProcess(command, rc, _read(out), _read(err))


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


_ZYGOTE: _Zygote | None = None
_STARTING = threading.Lock()   # tests start runs from several threads at once (two curate shard jobs, say)


def _zygote() -> _Zygote:
    global _ZYGOTE
    with _STARTING:
        if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
            _ZYGOTE = _Zygote()
        return _ZYGOTE


def stop_zygote() -> None:
    """End this test process's zygote (its runs have all finished by then)."""
    if _ZYGOTE is not None and _ZYGOTE.proc.poll() is None:
        _ZYGOTE.proc.stdin.close()
        _ZYGOTE.proc.kill()
        _ZYGOTE.proc.wait(timeout=30)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc`, after asserting it succeeded (with the end of its output as the failure message)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
