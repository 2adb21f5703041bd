"""LocalBackend: streams output, fails on non-zero exit, and leaves no process behind when killed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from operators.backends import JobFailed, JobSpec
from operators.backends.local import LocalBackend

HERE = Path(__file__).parent


def sleeper_spec(mode: str, launcher: str = "python", procs: int = 1) -> JobSpec:
    return JobSpec(stage=mode, config_yaml="answer: 42\n", launcher=launcher, procs_per_node=procs,
                   module="sleeper", env={"PYTHONPATH": str(HERE)})


def test_streams_output_and_returns_the_result():
    lines: list[str] = []
    result = LocalBackend().run(sleeper_spec("ok"), log=lines.append)
    assert result["final_loss"] == 1.5 and result["config_seen"] == "answer: 42\n"
    assert any("started" in line for line in lines)


def test_jobs_run_below_the_control_planes_priority():
    """Training saturates the cores; at nice 10 it leaves Airflow's api-server and scheduler (nice 0) answering."""
    before = os.nice(0)
    result = LocalBackend().run(sleeper_spec("ok"), log=lambda line: None)
    assert result["niceness"] == min(before + 10, 19)
    assert LocalBackend(niceness=0).run(sleeper_spec("ok"), log=lambda line: None)["niceness"] == before


def test_torchrun_launcher_runs_every_rank():
    lines: list[str] = []
    LocalBackend().run(sleeper_spec("ok", "torchrun", procs=2), log=lines.append)
    # Two workers share one pipe and, unbuffered, a print is two writes: lines may interleave, so search them.
    assert set(re.findall(r"rank (\d) started", "\n".join(lines))) == {"0", "1"}


def test_non_zero_exit_fails_with_the_last_lines():
    with pytest.raises(JobFailed, match="exit status 3") as err:
        LocalBackend().run(sleeper_spec("fail"), log=lambda line: None)
    assert "boom" in str(err.value) and not err.value.permanent   # an ordinary failure: the task retries


def test_a_job_reporting_bad_input_fails_permanently():
    with pytest.raises(JobFailed, match="exit status 3") as err:
        LocalBackend().run(sleeper_spec("bad_input"), log=lambda line: None)
    assert err.value.permanent and "no registered model" in str(err.value)


def test_shards_run_as_processes_told_their_index():
    import dataclasses

    lines: list[str] = []
    spec = dataclasses.replace(sleeper_spec("shard"), shards=2, sharded=True)
    result = LocalBackend().run(spec, log=lines.append)
    assert result == {"shards": 2, "results": [{"shard": "0", "of": "2"}, {"shard": "1", "of": "2"}]}
    assert any(line.startswith("[shard 1] ") for line in lines)

    with pytest.raises(JobFailed, match=r"(?s)shard: shard 2 of 3 failed with exit status 4.*shard 2 is broken"):
        LocalBackend().run(dataclasses.replace(spec, shards=3), log=lambda line: None)


def _run_within(backend: LocalBackend, spec: JobSpec, log, timeout: float = 60.0):
    """backend.run in a thread: returns its result or raises its error, and fails the test if it hangs."""
    out: list = []

    def target():
        try:
            out.append(backend.run(spec, log=log))
        except BaseException as exc:   # noqa: BLE001 - re-raised below
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the task hung for {timeout}s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_a_malformed_result_line_is_counted_and_does_not_hang_the_task():
    lines: list[str] = []
    backend = LocalBackend()
    result = _run_within(backend, sleeper_spec("malformed_then_ok"), lines.append)
    assert result == {"final_loss": 1.25}
    assert backend.malformed_results == 2
    assert any("malformed SEEKFLOW_RESULT line" in line for line in lines)
    assert any("2 malformed SEEKFLOW_RESULT line(s) ignored" in line for line in lines)
    assert any(line.startswith("not utf-8: ") for line in lines) and any("line 3999 " in line for line in lines)


def test_a_job_whose_only_result_is_malformed_fails_cleanly():
    backend = LocalBackend()
    with pytest.raises(JobFailed, match=r"exited 0 but its result is unreadable: 2 malformed SEEKFLOW_RESULT"):
        _run_within(backend, sleeper_spec("malformed"), lambda line: None)
    assert backend.malformed_results == 2


def test_a_failing_log_handler_does_not_stop_the_output_pump():
    def log(line):
        if not line.startswith("local backend"):   # the job's lines, which the pump thread logs
            raise RuntimeError("log handler broke")

    assert _run_within(LocalBackend(), sleeper_spec("malformed_then_ok"), log) == {"final_loss": 1.25}


def test_a_job_sees_the_allow_list_not_the_workers_environment(monkeypatch):
    """Set on the real process (os.environ is putenv): the job's /proc/self/environ must not hold Airflow's secrets."""
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "fernet-key-must-not-leak")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:db-password@db/airflow")
    monkeypatch.setenv("ACME_PAYMENTS_API_TOKEN", "made-up-secret-must-not-leak")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "job-identity")
    monkeypatch.setenv("SEEKFLOW_SCRATCH", "/tmp/seekflow-scratch-test")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    seen = LocalBackend().run(sleeper_spec("environ"), log=lambda line: None)
    assert seen["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999" and seen["AWS_ACCESS_KEY_ID"] == "job-identity"
    assert seen["SEEKFLOW_SCRATCH"] == "/tmp/seekflow-scratch-test" and seen["LC_ALL"] == "C.UTF-8"
    assert seen["PATH"] == os.environ["PATH"] and seen["PYTHONUNBUFFERED"] == "1"
    assert not [k for k in seen if k.startswith("AIRFLOW")], sorted(seen)
    assert "ACME_PAYMENTS_API_TOKEN" not in seen
    text = "\n".join(seen.values())
    assert "must-not-leak" not in text and "db-password" not in text

    # A deployment widens it by name or pattern; Airflow's settings stay out even when named.
    monkeypatch.setenv("SEEKFLOW_JOB_ENV_ALLOW", "ACME_PAYMENTS_*, AIRFLOW__CORE__FERNET_KEY")
    seen = LocalBackend(env_allow=["LC_ALL"]).run(sleeper_spec("environ"), log=lambda line: None)
    assert seen["ACME_PAYMENTS_API_TOKEN"] == "made-up-secret-must-not-leak"
    assert "AIRFLOW__CORE__FERNET_KEY" not in seen


def test_multi_node_is_refused_locally():
    spec = JobSpec(stage="pretrain", config_yaml="", launcher="torchrun", nodes=2)
    with pytest.raises(ValueError, match="2 nodes"):
        LocalBackend().command(spec, "x.yaml")


def _ready_count(lines: list[str]) -> int:
    """Workers that printed "ready <pid>". Two workers share one pipe and, unbuffered, a print is two writes: their
    lines may interleave, so search the joined text rather than line starts."""
    return len(re.findall(r"ready \d+ child", "".join(lines)))


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_kill_stops_torchrun_and_every_descendant():
    backend = LocalBackend(kill_grace_s=5)
    lines: list[str] = []
    errors: list[BaseException] = []

    def target():
        try:
            backend.run(sleeper_spec("sleep", "torchrun", procs=2), log=lines.append)
        except BaseException as exc:   # noqa: BLE001 - we assert on it below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    assert _wait_for(lambda: _ready_count(lines) == 2), lines
    root = psutil.Process(backend.pid)
    tree = [root, *root.children(recursive=True)]
    assert len(tree) >= 5   # torchrun + 2 workers + their 2 children

    backend.kill()
    thread.join(30)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], JobFailed) and "killed" in str(errors[0])
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"survivors: {alive}"


@pytest.mark.slow
def test_job_dies_with_a_hard_killed_task_process(tmp_path):
    """If the Airflow task process is SIGKILLed (no on_kill), the kernel's parent-death signal stops the job."""
    script = tmp_path / "task.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE.parents[1])!r})
        from operators.backends.base import JobSpec
        from operators.backends.local import LocalBackend
        spec = JobSpec(stage="sleep", config_yaml="", launcher="torchrun", procs_per_node=2, module="sleeper",
                       env={{"PYTHONPATH": {str(HERE)!r}}})
        LocalBackend().run(spec, log=lambda line: print(line, flush=True))
    """))
    task = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    for line in task.stdout:
        seen.append(line)
        if _ready_count(seen) == 2:
            break
    descendants = psutil.Process(task.pid).children(recursive=True)
    assert len(descendants) >= 5
    os.kill(task.pid, signal.SIGKILL)
    task.wait()
    _, alive = psutil.wait_procs(descendants, timeout=20)
    assert not alive, f"survivors: {alive}"


@pytest.mark.slow
def test_operator_on_kill_leaves_no_process(airflow_db):
    """What Airflow does when a running task is killed: on_kill() while execute() is blocked in the job."""
    from operators.job import TrainingJobOperator

    class SleepingJob(TrainingJobOperator):
        def build_spec(self):
            return sleeper_spec("sleep", "torchrun", procs=2)

    op = SleepingJob(task_id="pretrain", stage="pretrain", pipeline={"preset": "tiny"})
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, op.execute, {}))
    thread.start()
    assert _wait_for(lambda: op._backend is not None and op._backend.pid is not None)
    root = psutil.Process(op._backend.pid)
    assert _wait_for(lambda: len(root.children(recursive=True)) >= 4)
    tree = [root, *root.children(recursive=True)]
    op.on_kill()
    thread.join(30)
    assert errors and "killed" in str(errors[0])
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"survivors: {alive}"


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as exc:   # noqa: BLE001
        errors.append(exc)
