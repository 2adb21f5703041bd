"""seekflow_post_train through `dag.test()` with the local backend, on the micro preset, against a real MLflow server:
sft fine-tunes a release on the generated task suite, evaluate scores it on the held-out tasks, register records its
parent, promote gates it on the task accuracy; without a model to fine-tune it stops in validate_config."""
from __future__ import annotations

import json

import pytest


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_post_train_dag_fine_tunes_evaluates_registers_and_gates_a_release(dagbag, mlflow_server, chat_parent,
                                                                           monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    parent = chat_parent
    dagrun = dagbag["seekflow_post_train"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path / "run"), "sft.train.steps": 2, "sft.init_checkpoint": str(parent),
    })
    assert _states(dagrun) == {name: "success" for name in ("validate_config", "sft", "evaluate_sft", "register_sft",
                                                            "promote_sft")}, _states(dagrun)
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["outputs"]["parent"]["uri"] == str(parent)
    assert manifest["outputs"]["data"]["generated"]
    scores = json.loads((tmp_path / "run" / "evaluate_sft" / "manifest.json").read_text())["metrics"]
    assert 0 <= scores["tasks.accuracy"] <= 1 and "humaneval.pass_at_1" not in scores

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    registered = json.loads((tmp_path / "run" / "register_sft" / "manifest.json").read_text())["outputs"]
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["seekflow.trained_by"] == "sft" and version.tags["seekflow.parent_ref"] == str(parent)
    assert "seekflow.eval.tasks.accuracy" in version.tags and "seekflow.promotion.decision" in version.tags
    promoted = json.loads((tmp_path / "run" / "promote_sft" / "manifest.json").read_text())["outputs"]
    assert set(promoted["compared"]) == {"tasks.accuracy"}   # gated on the task suite alone


def test_post_train_dag_without_a_model_fails_in_validate_config(dagbag, tmp_path, capfd):
    dagrun = dagbag["seekflow_post_train"].test(run_conf={"profile": "micro", "run_root": str(tmp_path),
                                                          "sft.init_checkpoint": None})
    assert _states(dagrun) == {"validate_config": "failed", **{name: "upstream_failed" for name in (
        "sft", "evaluate_sft", "register_sft", "promote_sft")}}, _states(dagrun)
    out, err = capfd.readouterr()
    # the pipeline chain's sft reads the context-extended model (V3 §5 after §4.3)
    assert "sft.init_checkpoint: no long_context manifest at" in out + err
