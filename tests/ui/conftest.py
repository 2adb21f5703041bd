"""`airflow standalone` for the browser tests: a temp AIRFLOW_HOME, the repo's dags, the session's MLflow server.

The server's settings come from `scripts/local_platform.py` (what `make run` starts), pointed at temp dirs and free
ports, so the browser tests exercise the same platform a user gets.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.processes import REPO, free_port

DAG_ID = "seekflow_pipeline"


def load_local_platform(state: Path, airflow_port: int, mlflow_url: str):
    """A private copy of scripts/local_platform.py whose paths and ports point at this test's servers."""
    spec = importlib.util.spec_from_file_location("local_platform_for_ui_tests", REPO / "scripts" / "local_platform.py")
    lp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lp)
    lp.STATE, lp.AIRFLOW_HOME = state, state / "airflow"
    lp.PASSWORD_FILE = lp.AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
    lp.AIRFLOW_PORT, lp.AIRFLOW_URL = airflow_port, f"http://127.0.0.1:{airflow_port}"
    lp.MLFLOW_URL = mlflow_url
    return lp


def _stop(pgid: int, lp) -> None:
    """Stop `airflow standalone` (the leader of process group `pgid`) and everything it started, including the
    processes that left its group (executor workers, the jobs of the run the test triggered)."""
    import psutil

    try:
        started = psutil.Process(pgid).children(recursive=True)
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    deadline = time.time() + 20
    while time.time() < deadline and lp.group_alive(pgid):
        time.sleep(0.5)
    if lp.group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


class PatientApi:
    """The platform's REST client, as patient as a person at the UI: on a loaded 2-core machine Airflow's api-server
    can stall for 30-40 s (seen in CI while curation and another test's torchrun jobs held the cores), so a request
    that gets no answer (status 0) is tried again for up to 3 minutes. Answers, errors included, come back as they
    are."""

    def __init__(self, api, patience_s: float = 180):
        self._api, self._patience_s = api, patience_s

    def __call__(self, method, path, body=None):
        deadline = time.time() + self._patience_s
        while True:
            status, answer = self._api(method, path, body)
            if status != 0 or time.time() > deadline:
                return status, answer
            time.sleep(2)

    def __getattr__(self, name):   # log_entries and the rest of the platform's client
        return getattr(self._api, name)


@pytest.fixture(scope="session")
def airflow_standalone(mlflow_server, tmp_path_factory):
    state = tmp_path_factory.mktemp("platform")
    (state / "airflow").mkdir()
    lp = load_local_platform(state, free_port(), mlflow_server)
    spec = lp.airflow_spec()
    # Nothing of the test session's own Airflow settings (unit-test mode, its AIRFLOW_HOME) may leak into the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", **spec["env"]})
    log_path = state / "airflow.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(spec["cmd"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(n=60):
        """The server log's last n lines, less the api-server's per-request access lines (they crowd out the rest)."""
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if "[http.access]" not in line]
        return "\n".join(lines[-n:])

    try:
        deadline = time.time() + 240
        while not lp.airflow_healthy():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"airflow standalone not healthy at {lp.AIRFLOW_URL}:\n{log_tail()}")
            time.sleep(2)
        api = PatientApi(lp.Airflow())   # bearer token for admin, from the generated password file
        deadline = time.time() + 120
        while True:
            status, dag = api("GET", f"/dags/{DAG_ID}")
            if status == 200 and not dag.get("is_stale"):
                break
            if time.time() > deadline:
                _, errors = api("GET", "/importErrors")
                pytest.fail(f"{DAG_ID} not parsed after 120 s; import errors: {errors}\n{log_tail()}")
            time.sleep(2)
        yield SimpleNamespace(url=lp.AIRFLOW_URL, password=lp.airflow_password(), api=api, platform=lp,
                              home=state, log_tail=log_tail)
    finally:
        _stop(proc.pid, lp)
