"""seekflow_post_train through `dag.test()` with the local backend, on the micro preset: sft fine-tunes a release on
the generated task suite; without a model to fine-tune it stops in validate_config, before any job."""
from __future__ import annotations

import json

import pytest

from tests.support.mlflow_store import sqlite_store
from tests.support.sft import chat_parent


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_post_train_dag_fine_tunes_a_release(dagbag, tmp_path):
    parent = chat_parent(tmp_path / "parent")
    dagrun = dagbag["seekflow_post_train"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path / "run"), "sft.train.steps": 2, "sft.init_checkpoint": str(parent),
        "overrides": {"tracking.uri": sqlite_store(tmp_path / "run")}})
    assert _states(dagrun) == {"validate_config": "success", "sft": "success"}, _states(dagrun)
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["outputs"]["parent"]["uri"] == str(parent)
    assert manifest["outputs"]["data"]["generated"]


def test_post_train_dag_without_a_model_fails_in_validate_config(dagbag, tmp_path, capfd):
    dagrun = dagbag["seekflow_post_train"].test(run_conf={"profile": "micro", "run_root": str(tmp_path),
                                                          "sft.init_checkpoint": None})
    assert _states(dagrun) == {"validate_config": "failed", "sft": "upstream_failed"}, _states(dagrun)
    out, err = capfd.readouterr()
    assert "sft.init_checkpoint: no pretrain manifest at" in out + err
