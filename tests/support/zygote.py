"""A warm interpreter that forks the suite's single-process `python -m training` runs.

A fresh `python -m training pretrain` spends ~5 s importing mlflow (which pulls pandas) and torch before its first
step, and the suite starts dozens of such runs. The zygote imports those two once; each run is a child forked from it
that then behaves as `python -W ignore ARGV` would (`-m module args...` or `script.py args...`): its own session,
argv, environment, working directory and output files, and everything seekflow itself imports and patches
(megatron-core, the CPU shim, process groups) happens in the child, after the fork. megatron-core is deliberately not
preloaded: the CPU shim must be in place before megatron is first imported.

Protocol (JSON lines): the client writes {"id", "argv", "env", "cwd", "out", "err"} to the zygote's stdin; the zygote
answers {"id", "pid"} at the fork and {"id", "rc"} when the child exits (rc < 0: killed by that signal).
Run as `python -m tests.support.zygote`; `tests/support/processes.py` is the client.
"""
from __future__ import annotations

import json
import os
import sys
import threading


def _child(request: dict) -> None:
    """In the forked child: become `python -W ignore ARGV`, then exit with its status."""
    code = 1
    try:
        os.setsid()   # a timeout kills the run's whole process group, as for a subprocess in its own session
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        import runpy
        import warnings

        warnings.simplefilter("ignore")
        argv = request["argv"]
        try:
            if argv[0] == "-m":   # as `python -m module`: the working directory leads sys.path
                sys.argv, sys.path[0] = argv[1:], request["cwd"]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:                 # as `python script.py`: the script's folder leads sys.path
                sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:   # noqa: BLE001 - the child reports like a crashed interpreter
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:   # noqa: BLE001 - a closed stream cannot change the exit status
                pass
        os._exit(code)


def main() -> None:
    import mlflow  # noqa: F401 - preloaded: the point of the zygote
    import mlflow.tracking  # noqa: F401
    import torch  # noqa: F401

    answers = threading.Lock()
    running: dict[int, str] = {}

    def answer(message: dict) -> None:
        with answers:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def reap() -> None:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:   # no child yet: wait for the next fork
                forked.wait()
                forked.clear()
                continue
            with answers:
                request_id = running.pop(pid, None)
            if request_id is not None:
                answer({"id": request_id, "rc": os.waitstatus_to_exitcode(status)})

    forked = threading.Event()
    threading.Thread(target=reap, daemon=True).start()
    answer({"ready": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        with answers:   # registered before the reaper can see the child exit
            pid = os.fork()
            if pid == 0:
                _child(request)
            running[pid] = request["id"]
        forked.set()
        answer({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    main()
