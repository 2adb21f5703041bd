"""How a sandboxed program is started: the command line and process settings for each isolation mode.

"namespaces" (the default, and what runs on a workstation or under the local backend) starts the program with
bubblewrap (`bwrap`) in fresh user, PID, mount, network, IPC, UTS and cgroup namespaces:
    - the filesystem is empty except a read-only /usr (and the /bin, /lib links into it), a private /proc of the new
      PID namespace, a minimal /dev, and a size-limited tmpfs scratch directory (/sandbox, also /tmp);
    - the program file comes in through a memfd, so no host path is shared with it;
    - the network namespace has only a loopback device of its own: nothing on the host is reachable;
    - the environment is empty but for PATH, HOME and LANG, and bwrap itself is started with an empty environment, so
      /proc/1/environ (bwrap's init in the new PID namespace) holds nothing either;
    - when the caller is root, bwrap runs as `nobody` (65534): the kernel exempts root from RLIMIT_NPROC, and root
      outside the namespaces is what nothing should run as;
    - bwrap's init is PID 1 of the namespace: when the program's main process ends (or bwrap is killed:
      --die-with-parent), the kernel kills every process left in it, `setsid()` or not.

"pod" is for the sandbox pod on Kubernetes (k8s/platform/sandbox.yaml), where the runtime's default seccomp profile
forbids the user namespaces bwrap needs. There the pod is the boundary: no secrets, no service-account token, no
network (a deny-all NetworkPolicy), non-root, read-only root filesystem, all capabilities dropped. Inside it a
program still gets the kernel limits, an empty environment, its own session and a scratch directory, and the
service reaps what a program leaves behind (it is a child subreaper). `pod` refuses to run anywhere that does not
look like that pod (a service-account token or credentials in the environment), so it cannot be chosen by mistake.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from training.verify.spec import Limits

NOBODY = 65534
SCRATCH = "/sandbox"
PROGRAM = "program.py"
POD_MARKER_ENV = "SEEKFLOW_SANDBOX_POD"    # set by k8s/platform/sandbox.yaml
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
CREDENTIAL_PREFIXES = ("AWS_", "MLFLOW_", "AIRFLOW", "SEEKFLOW_S3")

# The trusted launcher: set the kernel limits on itself, then run the program. It runs as the sandbox's first
# Python process so the limits hold for the program and everything it starts. Setting them here rather than in a
# `preexec_fn` keeps `run_many`'s thread pool safe (preexec_fn is unsafe with threads).
LAUNCHER = """
import resource, runpy, sys
mem, cpu, fsize, nproc = (int(v) for v in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; nothing falls back to running the program unsandboxed."""


@dataclass
class Launch:
    """What `subprocess.Popen` needs to start one program; `cleanup` runs after it ended."""

    argv: list[str]
    popen: dict = field(default_factory=dict)
    cleanup: list = field(default_factory=list)

    def close(self) -> None:
        for step in self.cleanup:
            step()


PYTHON_ENV = "SEEKFLOW_SANDBOX_PYTHON"


def _world_traversable(path: str) -> bool:
    parts = Path(path).parents
    return all(p.stat().st_mode & 0o001 for p in parts)


def interpreter() -> str:
    """The Python that runs programs (stdlib only, never our site-packages): $SEEKFLOW_SANDBOX_PYTHON, else the
    real interpreter behind this venv when `nobody` can reach it, else the system's /usr/bin/python3 (a pyenv
    interpreter under /root is out of reach once bwrap runs as `nobody`)."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    ours = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if os.geteuid() != 0 or _world_traversable(ours):
        return ours
    if os.path.exists("/usr/bin/python3"):
        return os.path.realpath("/usr/bin/python3")
    raise SandboxUnavailable(f"no interpreter the sandbox user can run: {ours} is not reachable by uid {NOBODY}; "
                             f"set {PYTHON_ENV}")


def _launcher_args(limits, program: str) -> list[str]:
    return [interpreter(), "-I", "-S", "-B", "-c", LAUNCHER, str(limits.memory_mb << 20), str(limits.cpu_s),
            str(limits.output_kb << 10), str(limits.processes), program]


def _drop_root() -> dict:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}


def _system_mounts() -> list[str]:
    """Read-only /usr, and /bin, /lib, /lib64, /sbin as on the host (links into /usr on merged-/usr systems)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(interpreter()).parents[1])
    if not prefix.startswith("/usr"):   # an interpreter built elsewhere (pyenv, /opt/python): its own tree
        args += ["--ro-bind", prefix, prefix]
    return args


def bwrap() -> str:
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        raise SandboxUnavailable("bubblewrap is not installed: the sandbox needs `bwrap` "
                                 "(Debian/Ubuntu: apt-get install bubblewrap)")
    return path


def namespaces_launch(source: str, limits) -> Launch:
    fd = os.memfd_create("seekflow-program", 0)
    os.write(fd, source.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    argv = [bwrap(), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", *_system_mounts(), "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.scratch_mb << 20), "--tmpfs", SCRATCH, "--symlink", SCRATCH, "/tmp",
            "--perms", "0444", "--ro-bind-data", str(fd), f"{SCRATCH}/{PROGRAM}", "--chdir", SCRATCH,
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SCRATCH,
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0", "--setenv", "OMP_NUM_THREADS", "1",
            "--", *_launcher_args(limits, PROGRAM)]
    return Launch(argv, {"pass_fds": (fd,), "cwd": "/", **_drop_root()}, [lambda: os.close(fd)])


def check_pod() -> None:
    """Refuse `pod` isolation outside a sandbox pod: there the pod itself must hold nothing worth stealing."""
    if os.environ.get(POD_MARKER_ENV) != "1":
        raise SandboxUnavailable(f"isolation 'pod' runs only in the sandbox pod ({POD_MARKER_ENV}=1 is not set)")
    if SERVICE_ACCOUNT_TOKEN.exists():
        raise SandboxUnavailable(f"isolation 'pod' refused: a service-account token is mounted at "
                                 f"{SERVICE_ACCOUNT_TOKEN} (set automountServiceAccountToken: false)")
    leaked = sorted(k for k in os.environ if k.startswith(CREDENTIAL_PREFIXES))
    if leaked:
        raise SandboxUnavailable(f"isolation 'pod' refused: the sandbox pod's environment holds {leaked}")


def pod_launch(source: str, limits) -> Launch:
    check_pod()
    work = tempfile.mkdtemp(prefix="seekflow-sandbox-")
    (Path(work) / PROGRAM).write_text(source)
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1"}
    return Launch(_launcher_args(limits, PROGRAM), {"cwd": work, "env": env},
                  [lambda: shutil.rmtree(work, ignore_errors=True)])


LAUNCHERS = {"namespaces": namespaces_launch, "pod": pod_launch}


@functools.cache
def preflight(isolation: str) -> None:
    """Start one empty sandbox, once per process: a host without bwrap or user namespaces fails here, clearly,
    rather than scoring every program as failed."""
    if isolation == "pod":
        check_pod()
        return
    launch = namespaces_launch("", Limits())
    try:
        proc = subprocess.run(launch.argv, env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                              **launch.popen)
    finally:
        launch.close()
    if proc.returncode != 0:
        raise SandboxUnavailable(f"bubblewrap could not start a sandbox (exit {proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace').strip()[:500]} -- it needs unprivileged "
                                 "user namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces)")
