"""The long_context stage on the micro preset: a 32-token parent (the shared one-process run's release) extended with
YaRN s = 4 in two phases, 64 then 128 tokens (tests/support/presets/micro.yaml)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import REPO, repo_env, run_training


def arguments(run_root, parent, corpus, *extra: str) -> list[str]:
    """`long_context --preset micro` from the release `parent` on the corpus under `corpus`, logging to a sqlite
    store under `run_root`; `extra`: more `key=value` overrides."""
    sets = [f"run_root={run_root}", f"init_checkpoint={parent}", f"data_manifest={corpus}/curate",
            f"tracking.uri={sqlite_store(run_root)}", "tracking.tags.dag_run_id=test-run", *extra]
    return ["long_context", "--preset", "micro", *[a for item in sets for a in ("--set", item)]]


def long_context(run_root, parent, corpus, *extra: str) -> subprocess.CompletedProcess:
    return run_training(*arguments(run_root, parent, corpus, *extra))


def kill_9_after(run_root, parent, corpus, line: str) -> str:
    """Start the stage, SIGKILL it as soon as `line` appears in its output (no clean shutdown of any kind); return
    the output. It goes to a file, not a pipe, so a helper process cannot hold the pipe open."""
    log = run_root / "killed.log"
    run_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-W", "ignore", "-m", "training", *arguments(run_root, parent, corpus)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=repo_env(),
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while line not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return log.read_text()


def phase_losses(run_root, phase: int, stage: str = "long_context") -> dict[int, float]:
    """step -> lm_loss of the newest MLflow run of phase `phase` under `run_root` (each phase is a nested run)."""
    import mlflow

    client = mlflow.MlflowClient(sqlite_store(run_root))
    runs = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id],
                              filter_string=f"tags.`seekflow.phase` = '{stage}/phase_{phase}'",
                              order_by=["attributes.start_time DESC"])
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "lm_loss")}
