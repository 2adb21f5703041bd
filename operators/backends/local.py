"""The embedded default backend: the job runs as local processes on this machine: `torchrun` for a torchrun stage with
more than one process per node, otherwise `python` itself.

Output is streamed line by line into the task log. The job gets its own process group, so `kill()` reaches torchrun
and every worker it spawned; and each job asks the kernel to SIGTERM it if the Airflow task process dies first
(PR_SET_PDEATHSIG), so a hard-killed worker leaves no orphans training in the background. Jobs run at nice 10, below
Airflow's own processes.

A job sees only an allow-list of the worker's environment (`JOB_ENV_ALLOW`, plus `$SEEKFLOW_JOB_ENV_ALLOW`), never
Airflow's own settings: its database URL, fernet key and JWT secret stay in the worker. The output pump survives
anything a job prints (malformed result lines are logged and counted, bytes that are not UTF-8 are replaced), so the
pipe is always drained and the task cannot hang waiting for the job.
"""
from __future__ import annotations

import collections
import ctypes
import fnmatch
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterable, Mapping

from operators.backends.base import FAILURE_PREFIX, RESULT_PREFIX, JobFailed, JobSpec, MalformedResult, read_result

_PR_SET_PDEATHSIG = 1
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"    # the names a Kubernetes Indexed Job's pods see (k8s_render sets the
SHARD_COUNT_ENV = "SEEKFLOW_NUM_SHARDS"     # count; Kubernetes sets the index)

# The worker's environment variables a job may see (exact names, or shell patterns): what `python -m training`,
# torch and the libraries it loads read, and the job's own MLflow and S3 identity. Nothing else (Airflow's
# AIRFLOW__* settings, connections, secrets of other services) is passed.
JOB_ENV_ALLOW = (
    # the process: where programs are, who and where it is, locale, scratch space
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH",
    # the interpreter (PYTHONPATH makes `-m training` importable where Airflow runs from elsewhere)
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8",
    "VIRTUAL_ENV",
    # MLflow: the tracking server and the job's credentials for it
    "MLFLOW_TRACKING_*", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS", "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_HTTP_REQUEST_*",
    # S3 (boto3): the job's object-store identity and endpoint
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_*", "AWS_CA_BUNDLE",
    # seekflow's settings: SEEKFLOW_HOME, SEEKFLOW_SCRATCH, SEEKFLOW_EXTRA_PRESETS, SEEKFLOW_GIT_COMMIT...
    "SEEKFLOW_*",
    # devices, threads, collectives and compilers: CUDA, NCCL, gloo, torch, Transformer Engine, Triton
    "CUDA_*", "NVIDIA_*", "NCCL_*", "GLOO_*", "TORCH_*", "TORCHINDUCTOR_*", "PYTORCH_*", "NVTE_*", "TRITON_*",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    # Hugging Face libraries (the export loads transformers), offline: nothing is downloaded
    "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    # TLS roots and proxies, where the network needs them to reach MLflow and S3
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
    "https_proxy", "no_proxy",
)
JOB_ENV_ALLOW_ENV = "SEEKFLOW_JOB_ENV_ALLOW"   # more names or patterns for a deployment, comma or space separated
JOB_ENV_DENY = ("AIRFLOW*", "_AIRFLOW*")       # Airflow's own settings: never passed, whatever an allow-list says


def job_environment(parent: Mapping[str, str], extra_allow: Iterable[str] = ()) -> dict[str, str]:
    """The variables of `parent` a job may see: JOB_ENV_ALLOW, `extra_allow` and $SEEKFLOW_JOB_ENV_ALLOW, minus
    JOB_ENV_DENY."""
    allow = (*JOB_ENV_ALLOW, *extra_allow, *parent.get(JOB_ENV_ALLOW_ENV, "").replace(",", " ").split())
    return {name: value for name, value in parent.items()
            if any(fnmatch.fnmatchcase(name, p) for p in allow)
            and not any(fnmatch.fnmatchcase(name, p) for p in JOB_ENV_DENY)}


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


class LocalBackend:
    def __init__(self, python: str = sys.executable, workdir: str | None = None, kill_grace_s: float = 15.0,
                 tail_lines: int = 40, niceness: int = 10, env_allow: Iterable[str] = ()):
        self.python = python
        self.env_allow = tuple(env_allow)   # names or patterns passed on top of JOB_ENV_ALLOW
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
        self.malformed_results = 0   # malformed SEEKFLOW_RESULT lines, over every process of the job

    def command(self, spec: JobSpec, config_path: str) -> list[str]:
        if spec.nodes != 1:
            raise ValueError(f"the local backend runs on one machine; {spec.stage} asks for {spec.nodes} nodes")
        # One process needs no rendezvous: torchrun's agent would add ~1.5 s of start-up and nothing else (the stage
        # initialises a one-process group itself: training/parallel/setup.py).
        if spec.launcher == "python" or spec.procs_per_node == 1:
            return [self.python, *spec.training_args(config_path)]
        return [self.python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={spec.procs_per_node}",
                # Port 0: the rendezvous store binds a free port itself (as --standalone does); a port picked here
                # and bound later could be taken in between by a concurrent job.
                "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=0",
                *spec.training_args(config_path)]

    def run(self, spec: JobSpec, log: Callable[[str], None]) -> dict:
        with tempfile.NamedTemporaryFile("w", prefix=f"seekflow-{spec.stage}-", suffix=".yaml", delete=False) as f:
            f.write(spec.config_yaml)
            config_path = f.name
        cmd = self.command(spec, config_path)
        env = {**job_environment(os.environ, self.env_allow), "PYTHONUNBUFFERED": "1", **spec.env}
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
                                    encoding="utf-8", errors="replace", cwd=self.workdir, env=env, start_new_session=True,
                                    preexec_fn=_child_setup(self.niceness))
            self._procs.append(proc)
        output.start(proc.stdout)
        returncode = proc.wait()
        # Processes the job left behind (say, children of a worker that crashed) still hold the output pipe open
        # and would run on unsupervised: they end with the job.
        _end_group(proc.pid, grace_s=2.0)
        output.join(timeout=30)
        if output.malformed:
            with self._lock:
                self.malformed_results += output.malformed
            log(f"local backend: {label}: {output.malformed} malformed {RESULT_PREFIX.strip()} line(s) ignored")
        if self._killed:
            raise JobFailed(f"{label}: killed (exit status {returncode})")
        last = "\n".join(output.tail)
        if returncode != 0:
            raise JobFailed(f"{label} failed with exit status {returncode}; last output:\n{last}",
                            permanent=output.bad_input)
        if output.result_broken:   # exit 0, but what it reported last is unreadable: downstream would get nothing
            raise JobFailed(f"{label} exited 0 but its result is unreadable: {output.malformed} malformed "
                            f"{RESULT_PREFIX.strip()} line(s) and no well-formed one after them; last output:\n{last}")
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
    """Streams the job's output into the task log on a thread; keeps the last lines and the stage's result.

    Nothing a job prints stops it: while the pump reads, the job can write; were the pump to die, the job would
    block on a full pipe and the task on proc.wait(), forever."""

    def __init__(self, log: Callable[[str], None], tail_lines: int):
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.result: dict = {}
        self.malformed = 0             # malformed SEEKFLOW_RESULT lines
        self.result_broken = False     # the last SEEKFLOW_RESULT line was malformed
        self.bad_input = False         # the job reported bad input (SEEKFLOW_FAILURE): a retry cannot help
        self._thread: threading.Thread | None = None

    def start(self, stream) -> None:
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        try:
            for line in stream:
                self._take(line.rstrip("\n"))
        except Exception as exc:   # noqa: BLE001 - reading failed: say so, and still drain the pipe below
            self._log(f"local backend: reading the job's output failed ({type(exc).__name__}: {exc}); the rest of "
                      f"it is discarded")
        finally:
            _drain(stream)

    def _take(self, line: str) -> None:
        self._log(line)
        self.tail.append(line)
        if line.startswith(FAILURE_PREFIX):
            self.bad_input = True
            return
        try:
            result = read_result(line)
        except MalformedResult as exc:
            self.malformed += 1
            self.result_broken = True
            self._log(f"local backend: {exc}")
            return
        if result is not None:
            self.result, self.result_broken = result, False

    def _log(self, line: str) -> None:
        try:
            self.log(line)
        except Exception:   # noqa: BLE001 - a failing log handler costs the line, never the pump
            pass

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _drain(stream) -> None:
    """Read the pipe to its end, discarding: the job must never block on a full pipe."""
    raw = getattr(stream, "buffer", stream)
    while True:
        try:
            if not raw.read(65536):
                return
        except Exception:   # noqa: BLE001 - closed or broken: there is nothing left to read
            return
