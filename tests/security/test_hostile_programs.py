"""Hostile programs, scored as HumanEval completions through the real sandbox (bubblewrap namespaces), each contained.

The evaluation runs in a fresh interpreter whose real environment holds planted secrets (in /proc/<pid>/environ, not
only in os.environ). For each program: the evaluation completes and scores it a failure with a reason; nothing it
started outlives the call; and no secret appears in any output, record, MLflow field or artifact, or log. Both paths
are tried: programs run by the job itself, and programs sent to the sandbox service.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.processes import pids_running

ROOT = Path(__file__).resolve().parents[2]
HOME = Path.home()
SLEEP_MARK = "6061.5"   # the setsid child's sleep: findable in the process table should it survive

# Each is the body of HumanEval/0's function (`has_close_elements`); `{...}` fields are filled in per run.
HOSTILE = {
    "parent_environ": "    import os\n    raise RuntimeError(open(f'/proc/{{os.getppid()}}/environ').read())\n",
    "init_environ": "    raise RuntimeError(open('/proc/1/environ').read())\n",
    "every_environ": ("    import os\n    seen = []\n    for pid in os.listdir('/proc'):\n"
                      "        try:\n            seen.append(open(f'/proc/{{pid}}/environ').read())\n"
                      "        except Exception:\n            pass\n    raise RuntimeError('|'.join(seen))\n"),
    "socket": ("    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "    s.sendall(b'stolen')\n    return True\n"),
    "write_project": ("    open({project!r}, 'w').write('pwned')\n    return True\n"),
    "write_home": ("    open({home!r}, 'w').write('pwned')\n    return True\n"),
    "fork_bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n"),
    "setsid_sleep": ("    import os\n    if os.fork() == 0:\n        os.setsid()\n"
                     f"        os.execv('/bin/sleep', ['sleep', '{SLEEP_MARK}'])\n    return True\n"),
    "stderr_to_dev_zero": ("    import os, sys\n    for name in ('stdout', 'stderr', '/tmp/stderr'):\n"
                           "        try:\n            os.symlink('/dev/zero', name)\n        except OSError:\n"
                           "            pass\n    zero = os.open('/dev/zero', os.O_RDONLY)\n"
                           "    os.dup2(zero, 2)\n    os.dup2(zero, 1)\n    raise RuntimeError('x')\n"),
    "fill_scratch": ("    for i in range(10 * 1024):   # 10 GB in 1 MiB files\n"
                     "        open(f'/tmp/fill-{{i}}', 'wb').write(b'x' * (1 << 20))\n    return True\n"),
    "allocate_10gb": "    x = bytearray(10 * 1024 ** 3)\n    return True\n",
    "infinite_loop": "    while True:\n        pass\n",
    "output_flood": "    while True:\n        print('flood ' * 20)\n",
}
# What each must be scored as: (status, words the reason must hold). Anything else failing with a reason is fine.
EXPECTED = {
    "fork_bomb": ("timeout", ""),
    "fill_scratch": ("failed", "scratch space limit"),
    "allocate_10gb": ("failed", "memory limit"),
    "infinite_loop": ("timeout", ""),
    "output_flood": ("failed", "output limit"),
    "socket": ("failed", "Connection refused"),
    "write_project": ("failed", "No such file or directory"),
    "write_home": ("failed", "No such file or directory"),
}
LIMITS = {"wall_s": 4.0, "cpu_s": 2, "memory_mb": 512, "output_kb": 1024, "scratch_mb": 32, "processes": 32}


@pytest.fixture(scope="module")
def listener():
    """A socket listening on the host's loopback: a program that reaches it shows up in `received`."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    received: list[bytes] = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            received.append(conn.recv(100) or b"<connected>")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], received
    server.close()


@pytest.fixture(scope="module", params=["local", "service"])
def hostile_run(request, listener, mlflow_server, tmp_path_factory):
    """Score every hostile program once (per path); return the report, the log, the secrets and the targets."""
    work = tmp_path_factory.mktemp(f"hostile-{request.param}")
    targets = {"project": str(ROOT / "dags" / f"pwned-{work.name}.py"), "home": str(HOME / f"pwned-{work.name}")}
    planted = {"SEEKFLOW_PLANTED_SECRET": secrets.token_hex(16), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
               "AIRFLOW__CORE__FERNET_KEY": secrets.token_hex(16)}
    completions = [HOSTILE[name].format(port=listener[0], **targets) for name in HOSTILE]
    spec = {"completions": completions, "limits": LIMITS, "via": request.param, "mlflow_uri": mlflow_server}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **planted}
    proc = subprocess.run([sys.executable, "-m", "tests.support.hostile_eval", str(work / "spec.json"),
                           str(work / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "out.json").read_text())
    return {"report": report, "log": proc.stdout + proc.stderr, "planted": planted, "targets": targets,
            "via": request.param}


def test_every_hostile_program_is_scored_a_failure_with_a_reason(hostile_run):
    records = hostile_run["report"]["records"]
    assert len(records) == len(HOSTILE)
    for name, record in zip(HOSTILE, records):
        assert record["status"] in ("failed", "timeout"), (name, record)
        assert record["reason"] and record["reason"] != "ok", (name, record)
        status, words = EXPECTED.get(name, (record["status"], ""))
        assert record["status"] == status and words in record["reason"], (name, record)
    assert hostile_run["report"]["metrics"]["pass_at_1"] == 0.0


def test_no_process_outlives_the_evaluation(hostile_run):
    assert hostile_run["report"]["survivors"] == []
    assert pids_running(SLEEP_MARK) == []


def test_nothing_escaped_to_the_host(hostile_run, listener):
    assert listener[1] == []   # nothing connected to the host's loopback
    for path in hostile_run["targets"].values():
        assert not Path(path).exists(), path


def test_no_planted_secret_appears_in_any_output_record_log_or_mlflow(hostile_run, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(hostile_run["report"]["run_id"])
    artifacts = Path(client.download_artifacts(run.info.run_id, "humaneval/records.json"))
    places = {
        "log": hostile_run["log"],
        "records": json.dumps(hostile_run["report"]),
        "mlflow run": json.dumps([run.data.params, run.data.tags, run.data.metrics]),
        "mlflow artifact": artifacts.read_text(),
    }
    # The environment reads did happen (so the check below is not vacuous): their reasons are in the records.
    reasons = {r["reason"] for r in hostile_run["report"]["records"][:3]}
    assert all(reason.startswith("RuntimeError") for reason in reasons), reasons
    for where, text in places.items():
        for name, secret in hostile_run["planted"].items():
            assert secret not in text, f"{name} leaked into the {where} ({hostile_run['via']})"

