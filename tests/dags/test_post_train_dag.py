"""seekflow_post_train through `dag.test()` with the local backend, on the micro preset, against a real MLflow server:
the r1 recipe's four steps (cold-start sft, GRPO, rejection sampling + sft, GRPO) each train, are scored on the
held-out tasks and registered with their parent, and the last is gated on the task accuracy; without a model to
fine-tune the DAG stops in validate_config. (The sft recipe's chain runs in the pipeline fixture's seekflow_pipeline:
sft, evaluate_sft, register_sft, promote_sft.)"""
from __future__ import annotations

import json

import pytest


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


R1_STEPS = ("sft_cold_start", "grpo_reasoning", "sft_rejection", "grpo_all")
SFT_RECIPE = ("sft", "evaluate_sft", "register_sft", "promote_sft")


@pytest.mark.slow
def test_the_r1_recipe_registers_each_step_with_its_parent_and_gates_the_last(dagbag, mlflow_server, micro_teacher,
                                                                             monkeypatch, tmp_path):
    """recipe=r1 from a micro model that answers its 8 sort prompts: each of the four steps trains, is scored on
    held-out tasks and registered with the step before it as parent; the last is gated; the sft recipe is skipped."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run = tmp_path / "run"
    dagrun = dagbag["seekflow_post_train"].test(run_conf={
        "profile": "micro", "run_root": str(run), "recipe": "r1", "sft.init_checkpoint": str(micro_teacher),
        "sft.tasks.train_items": 8,   # the prompts the teacher answers, now written as reasoning turns
        # the cold start learns the 8 reasoning turns (~18 s); the GRPO steps move the policy little, so that the
        # rejection sampling still finds correct replies to keep (micro grpo's lr of 3e-3 wrecks it in one step)
        "overrides": {"sft_cold_start.train.steps": 120, "sft_cold_start.train.save_interval": 120,   # one save
                      "sft_rejection.train.steps": 2,
                      # the Hugging Face export is the pipeline test's to check: not four times here
                      **{f"register_{step}.export_hf": False for step in R1_STEPS},
                      **{f"{step}.{key}": value for step in ("grpo_reasoning", "grpo_all") for key, value in (
                          ("train.steps", 2), ("optimizer.lr", 1e-5), ("optimizer.min_lr", 1e-5))}},
    })
    states = _states(dagrun)
    assert {name: states[name] for name in SFT_RECIPE} == {name: "skipped" for name in SFT_RECIPE}, states
    assert {name: s for name, s in states.items() if name not in SFT_RECIPE} == {
        name: "success" for name in states if name not in SFT_RECIPE}, states

    def manifest(step: str) -> dict:
        return json.loads((run / step / "manifest.json").read_text())

    cold = manifest("sft_cold_start")
    assert cold["outputs"]["parent"]["uri"] == str(micro_teacher) and cold["outputs"]["data"]["generated"]
    data = run / "sft_cold_start" / "data" / "tasks_train.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert all(r["messages"][1]["reasoning_content"] for r in records)   # the cold start's reasoning turns
    grpo = manifest("grpo_reasoning")
    assert grpo["outputs"]["parent"]["uri"] == cold["outputs"]["release_checkpoint"]
    assert {"reward", "format_rate", "kl"} <= set(grpo["metrics"])
    rejection = manifest("sft_rejection")   # the policy's own kept samples, plus direct answers
    assert rejection["outputs"]["parent"]["uri"] == grpo["outputs"]["release_checkpoint"]
    counts = rejection["outputs"]["data"]["traces"]
    assert counts["kept"] >= 1 and counts["non_reasoning"] == round(counts["kept"] / 3)
    assert manifest("grpo_all")["outputs"]["parent"]["uri"] == rejection["outputs"]["release_checkpoint"]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    versions = {}
    for step in R1_STEPS:
        registered = manifest(f"register_{step}")["outputs"]
        versions[step] = client.get_model_version(registered["model_name"], registered["version"])
        assert versions[step].tags["seekflow.trained_by"] == step and "seekflow.eval.tasks.accuracy" in versions[step].tags
    assert len({v.name for v in versions.values()}) == 1   # one model, one version per step
    for parent, child in zip(R1_STEPS, R1_STEPS[1:]):   # the registry shows the recipe's chain
        assert versions[child].tags["seekflow.parent_version"] == versions[parent].version, (parent, child)
    promoted = manifest("promote_grpo_all")["outputs"]
    assert set(promoted["compared"]) == {"tasks.accuracy"} and "seekflow.promotion.decision" in client.get_model_version(
        versions["grpo_all"].name, versions["grpo_all"].version).tags


def test_post_train_dag_without_a_model_fails_in_validate_config(dagbag, tmp_path, capfd):
    # (recipe named: dag.test() keeps an earlier run's conf in the shared DAG object's params)
    dagrun = dagbag["seekflow_post_train"].test(run_conf={"profile": "micro", "run_root": str(tmp_path),
                                                          "recipe": "sft", "sft.init_checkpoint": None})
    states = _states(dagrun)
    assert states.pop("validate_config") == "failed" and set(states.values()) == {"upstream_failed"}, states
    out, err = capfd.readouterr()
    # the pipeline chain's sft reads the context-extended model (V3 §5 after §4.3)
    assert "sft.init_checkpoint: no long_context manifest at" in out + err, (out + err)[-3000:]
