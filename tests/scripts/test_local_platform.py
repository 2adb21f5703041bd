"""scripts/local_platform.py: what the terminal shows while following a run, and the loss trend in the summary."""
from __future__ import annotations

import importlib.util

import pytest

from tests.support.processes import REPO


@pytest.fixture(scope="module")
def platform():
    spec = importlib.util.spec_from_file_location("local_platform", REPO / "scripts" / "local_platform.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("line, shown", [
    ("pretrain: step 10/200 loss 11.7623 mtp 11.7660 lr 1.50e-03 ETA 163s", True),
    ("curate: 816 documents, 1,618,004 tokens in 15.2 s", True),
    ("register: created seekflow-tiny version 1", True),
    ("alias: candidate", False),          # the stage's config dump, not progress
    ("checkpoint: null", False),
    ("    steps: 200", False),
])
def test_progress_filter(platform, line, shown):
    assert bool(platform.PROGRESS.search(line) and not platform.CONFIG_LINE.match(line)) is shown


def test_loss_trend_reads_the_mlflow_history(platform, mlflow_server, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment("platform-summary")
    run = client.create_run(experiment)
    for step, value in enumerate([12.0, 11.0, 10.0, 9.0, 9.0, 8.0, 8.0, 7.0, 7.0, 6.0], start=1):
        client.log_metric(run.info.run_id, "lm_loss", value, step=step)
    monkeypatch.setattr(platform, "MLFLOW_URL", mlflow_server)
    assert platform.loss_trend(run.info.run_id) == \
        "  (MLflow lm_loss: first 10% of steps 12.00 -> last 10% 6.00, -50%)"
    assert platform.loss_trend(None) == ""
