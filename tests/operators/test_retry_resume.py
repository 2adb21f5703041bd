"""A pretrain task whose job dies mid-run succeeds on retry by resuming from its last checkpoint (local backend)."""
from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from tests.support.micro import write_corpus
from tests.support.mlflow_store import sqlite_store

STEPS = 12   # the first try is killed right after its step-3 save, long before step 12


def _pretrain_operator(run_root, steps):
    from operators.job import TrainingJobOperator

    overrides = {
        "run_root": str(run_root), "tracking.uri": sqlite_store(run_root),
        "pretrain.train.steps": steps, "pretrain.train.save_interval": 3,
    }
    return TrainingJobOperator(task_id="pretrain", stage="pretrain",
                               pipeline={"preset": "micro", "overrides": overrides})


@pytest.mark.slow
def test_job_killed_mid_run_resumes_on_retry(tmp_path, airflow_db):
    write_corpus(tmp_path)
    first_try = _pretrain_operator(tmp_path, steps=STEPS)
    lines: list[str] = []
    errors: list[BaseException] = []
    first_try.log.info = lambda msg, *args: lines.append(msg % args if args else msg)

    def run():
        try:
            first_try.execute({})
        except BaseException as exc:   # noqa: BLE001 - asserted below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while not any("saved iter_0000003" in line for line in lines):
        assert time.time() < deadline and thread.is_alive(), lines[-20:]
        time.sleep(0.2)
    worker = psutil.Process(first_try._backend.pid)   # one process: `python -m training`, no torchrun agent
    assert "training" in worker.cmdline(), worker.cmdline()
    worker.send_signal(signal.SIGKILL)   # the job dies: no on_kill, no clean shutdown
    thread.join(180)
    assert errors and "failed with exit status" in str(errors[0]), (thread.is_alive(), lines[-15:])

    retry = _pretrain_operator(tmp_path, steps=STEPS)
    retry_lines: list[str] = []
    retry.log.info = lambda msg, *args: retry_lines.append(msg % args if args else msg)
    result = retry.execute({})
    resumed = [line for line in retry_lines if "resumed from step" in line]
    assert resumed, retry_lines[-30:]
    step = int(resumed[0].split("resumed from step ")[1].split()[0])
    assert step >= 3 and step % 3 == 0
    assert not any(f"step {s}/{STEPS} " in line for line in retry_lines for s in range(1, step + 1))
    assert result["steps"] == STEPS
