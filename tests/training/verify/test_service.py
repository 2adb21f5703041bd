"""The sandbox service, run as a real process on loopback: outcomes in order, limits never looser than its own, clear
refusals, and the `pod` isolation's guard and reaper (what stands in for the PID namespace inside the sandbox pod)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.processes import pids_running
from training.verify.remote import run_remote
from training.verify.sandbox import Limits, run_many
from training.verify.service import clamp

ROOT = Path(__file__).resolve().parents[3]
MARK = "7071.25"


@contextmanager
def service(*args: str, env: dict | None = None):
    proc = subprocess.Popen([sys.executable, "-m", "training.verify.service", "--port", "0", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "serving on" not in line:
            proc.wait(timeout=30)
            raise RuntimeError(proc.stderr.read())
        yield "http://127.0.0.1:" + line.split("serving on ")[1].split()[0].rsplit(":", 1)[1]
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def url():
    with service() as address:
        yield address


def test_outcomes_come_back_in_order(url):
    outcomes = run_many([f"raise SystemExit({i % 2})" for i in range(5)] + ["raise KeyError('k')"], sandbox_url=url)
    assert [o.status for o in outcomes] == ["passed", "failed"] * 2 + ["passed", "failed"]
    assert outcomes[-1].reason == "KeyError: 'k'"


def test_a_request_can_tighten_limits_but_never_loosen_them(url):
    assert clamp({"wall_s": 1000, "memory_mb": 64}, Limits()) == Limits(memory_mb=64)
    out = run_remote(url, ["x = bytearray(600 * 1024 ** 2)"], Limits(memory_mb=100_000))
    assert out[0].status == "passed"   # 600 MiB fits under the service's 1 GiB, whatever was asked
    out = run_remote(url, ["x = bytearray(1536 * 1024 ** 2)"], Limits(memory_mb=100_000))
    assert out[0].reason.startswith("memory limit (1024 MiB) exceeded")


@pytest.mark.parametrize("body,error", [
    ({"programs": "print(1)"}, "'programs' must be a list of strings"),
    ({"programs": ["1"], "limits": {"wall": 3}}, "unknown limits ['wall']"),
    ({"programs": ["1"], "limits": {"cpu_s": -1}}, "limit 'cpu_s' must be a positive number"),
])
def test_bad_requests_are_refused_with_the_field_named(url, body, error):
    request = urllib.request.Request(url + "/run", data=json.dumps(body).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and error in json.loads(refused.value.read())["error"]


def test_an_unreachable_service_fails_clearly_after_retries():
    with pytest.raises(RuntimeError, match="unreachable after 2 attempts"):
        run_remote("http://127.0.0.1:9", ["print(1)"], attempts=2)


def _pod_env(**extra) -> dict:
    return {"PATH": os.environ["PATH"], "SEEKFLOW_SANDBOX_POD": "1", **extra}


def test_pod_isolation_reaps_a_setsid_orphan():
    program = ("import os\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               f"    os.execv('/bin/sleep', ['sleep', '{MARK}'])\n")
    with service("--isolation", "pod", env=_pod_env()) as address:
        outcome = run_remote(address, [program])[0]
        assert outcome.status == "passed", outcome
        time.sleep(0.2)
        assert pids_running(MARK) == []


def test_pod_isolation_refuses_to_run_outside_a_sandbox_pod():
    with pytest.raises(RuntimeError, match="SEEKFLOW_SANDBOX_POD=1 is not set"):
        with service("--isolation", "pod", env={"PATH": os.environ["PATH"]}):
            pass
    with pytest.raises(RuntimeError, match=r"environment holds \['AWS_SECRET_ACCESS_KEY'\]"):
        with service("--isolation", "pod", env=_pod_env(AWS_SECRET_ACCESS_KEY="x")):
            pass

