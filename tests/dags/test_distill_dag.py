"""seekflow_distill through `dag.test()` with the local backend, on the micro preset, against a real MLflow server: a
teacher named in the trigger form is sampled, a dense student trained on its correct traces, scored on the held-out
tasks, registered as a model of its own with the teacher and the traces as lineage, and gated; with no teacher it
stops in validate_config."""
from __future__ import annotations

import json

import pytest



def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_distill_dag_trains_a_dense_student_then_scores_registers_and_gates_it(dagbag, micro_teacher, mlflow_server,
                                                                              monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    teacher, run = micro_teacher, tmp_path / "run"
    dagrun = dagbag["seekflow_distill"].test(run_conf={
        "profile": "micro", "run_root": str(run), "distill.teacher": str(teacher), "distill.samples_per_prompt": 3})
    assert _states(dagrun) == {name: "success" for name in ("validate_config", "distill", "evaluate_distill",
                                                            "register_distill", "promote_distill")}, _states(dagrun)
    manifest = json.loads((run / "distill" / "manifest.json").read_text())
    assert manifest["outputs"]["parent"]["uri"] == str(teacher) and manifest["metrics"]["steps"] == 2
    assert manifest["outputs"]["data"]["traces"]["sampled"] == 8 * 3   # the form's samples_per_prompt
    student = json.loads((run / "distill" / "release" / "seekflow_model.json").read_text())
    assert student["num_experts"] is None
    scores = json.loads((run / "evaluate_distill" / "manifest.json").read_text())["metrics"]
    assert 0 <= scores["tasks.accuracy"] <= 1 and "humaneval.pass_at_1" not in scores

    # the student is a model of its own, its lineage the teacher and the kept traces
    registered = json.loads((run / "register_distill" / "manifest.json").read_text())["outputs"]
    assert registered["model_name"] == "seekflow-micro-student"
    version = MlflowClient(mlflow_server).get_model_version(registered["model_name"], registered["version"])
    assert version.tags["seekflow.trained_by"] == "distill" and version.tags["seekflow.parent_ref"] == str(teacher)
    traces = manifest["outputs"]["data"]
    assert (version.tags["seekflow.data_uri"], version.tags["seekflow.data_sha256"]) == (traces["uri"],
                                                                                       traces["sha256"])
    assert version.tags["seekflow.eval.tasks.accuracy"] == f"{scores['tasks.accuracy']:.6g}"
    promoted = json.loads((run / "promote_distill" / "manifest.json").read_text())["outputs"]
    assert promoted["model_name"] == "seekflow-micro-student" and promoted["version"] == registered["version"]
    assert version.tags["seekflow.promotion.decision"] == promoted["decision"]


def test_distill_dag_without_a_teacher_fails_in_validate_config(dagbag, tmp_path, capfd):
    # (explicitly unset: a DAG object keeps the Param values an earlier dag.test() in this process was given)
    dagrun = dagbag["seekflow_distill"].test(run_conf={"profile": "micro", "run_root": str(tmp_path),
                                                       "distill.teacher": None})
    assert _states(dagrun) == {"validate_config": "failed", **{name: "upstream_failed" for name in (
        "distill", "evaluate_distill", "register_distill", "promote_distill")}}, _states(dagrun)
    out, err = capfd.readouterr()
    assert "distill.teacher: no sft manifest at" in out + err


def test_distill_form_is_the_schema_and_rejects_what_the_config_rejects(dagbag):
    from operators.params import stage_form_fields
    from tests.support.forms import assert_form_and_config_refuse, served_params

    params = served_params(dagbag["seekflow_distill"])
    assert set(stage_form_fields("distill")) <= set(params) and "distill.teacher" in params
    assert params.validate()["distill.temperature"] == 0.6   # the tiny preset's value (R1 §3)
    for key, value, bound in (("distill.samples_per_prompt", 0, "1"), ("distill.temperature", 0, "0"),
                              ("distill.top_p", 1.5, "1"), ("distill.tasks.tasks", ["chess"], "countdown")):
        assert_form_and_config_refuse(params, key, value, bound)
