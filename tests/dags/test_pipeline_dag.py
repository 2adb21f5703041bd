"""The pipeline DAG: parses light, validates before compute, and runs end to end through `dag.test()` with the local
backend against a real MLflow server on loopback (the suite's one real-vocabulary run, the `pipeline_run` fixture:
real text through DeepSeek's tokenizer, cut to the tiny preset's first 3,824 merges)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.processes import REPO

ALL_TASKS = ("validate_config", "curate_shards", "curate", "pretrain", "evaluate", "register", "promote",
             "curate_code_shards", "curate_code", "code_cpt", "evaluate_code_cpt", "register_code_cpt",
             "promote_code_cpt", "long_context", "evaluate_long_context", "register_long_context",
             "promote_long_context", "sft", "evaluate_sft", "register_sft", "promote_sft")


def test_dag_file_imports_no_torch_megatron_or_mlflow():
    code = ("import sys, runpy; runpy.run_path('dags/seekflow_pipeline.py'); "
            "print(sorted(m for m in ('torch', 'megatron', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_trigger_form_params(dagbag):
    dag = dagbag["seekflow_pipeline"]
    assert set(dag.task_ids) == set(ALL_TASKS)
    params = dag.params.dump()
    assert params["profile"] == "tiny" and params["backend"] == "local" and params["steps"] is None
    schema = dag.params.get_param("profile").schema
    assert {"tiny", "deepseek-v3", "deepseek-v2-lite"} <= set(schema["enum"])


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_invalid_override_fails_before_any_compute(dagbag, mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    dagrun = dagbag["seekflow_pipeline"].test(run_conf={"overrides": {"pretrain.model.num_layers": -3},
                                                        "run_root": str(tmp_path)})
    states = _states(dagrun)
    assert states["validate_config"].endswith("failed")
    assert all(states[t].endswith("upstream_failed") for t in ALL_TASKS[1:]), states
    assert not (tmp_path / "curate").exists()


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_registers_a_candidate(pipeline_run):
    dagrun, mlflow_server, run_root = pipeline_run["dagrun"], pipeline_run["mlflow"], pipeline_run["run_root"]
    assert pipeline_run["states"] == {t: "success" for t in ALL_TASKS}, pipeline_run["states"]
    # curate ran as two shard processes, then the merge
    assert sorted(p.name for p in (run_root / "curate/shards").iterdir()) == ["0000-of-0002", "0001-of-0002"]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    version = client.get_model_version("seekflow-tiny", "1")   # the pretrained model: the first version
    tags = version.tags
    # evaluate's scores travel to the version; the first candidate within the gates' bounds becomes champion
    assert float(tags["seekflow.eval.perplexity.stdlib_code"]) > 1 and "seekflow.eval.humaneval.pass_at_1" in tags
    assert tags["seekflow.promotion.decision"] == "champion"
    # later versions (code_cpt, long_context) took the champion alias only if they passed the gates
    promoted = [v.version for v in client.search_model_versions("name = 'seekflow-tiny'")
                if v.tags.get("seekflow.promotion.decision") == "champion"]
    assert client.get_model_version_by_alias("seekflow-tiny", "champion").version == max(promoted, key=int)
    # tiny trains on a vocabulary subset, which has no Hugging Face form: the version says so (export's own tests
    # cover the Hugging Face checkpoint and its logits)
    assert tags["seekflow.hf_export"].startswith("none: a vocabulary-subset model") and tags["seekflow.git_commit"]
    assert tags["seekflow.dag_run_id"] == dagrun.run_id
    assert len(tags["seekflow.data_manifest_hash"]) == 16 and len(tags["seekflow.config_hash"]) == 16
    assert float(tags["seekflow.final_loss"]) > 0

    experiment = client.get_experiment_by_name("seekflow")
    runs = client.search_runs([experiment.experiment_id], f"tags.dag_run_id = '{dagrun.run_id}'")
    assert sorted(r.data.tags["seekflow.stage"] for r in runs if "mlflow.parentRunId" not in r.data.tags) == sorted(
        name for name in ALL_TASKS if name != "validate_config" and not name.endswith("_shards"))
    pretrain_run = next(r for r in runs if r.data.tags["seekflow.stage"] == "pretrain")
    assert [m.step for m in client.get_metric_history(pretrain_run.info.run_id, "lm_loss")] == [5, 10]
    assert version.run_id == next(r for r in runs if r.data.tags["seekflow.stage"] == "register").info.run_id

    from mlflow.artifacts import download_artifacts

    local = download_artifacts(f"runs:/{version.run_id}/checkpoint/metadata.json", tracking_uri=mlflow_server)
    assert os.path.getsize(local) > 0


def test_every_registered_version_points_to_its_parent(pipeline_run):
    """code_cpt continues the pretrained version; tiny's long_context extends the pretrained version too (its preset
    reads pretrain: V3 §4.3's order): MLflow shows the line."""
    from mlflow import MlflowClient

    client = MlflowClient(pipeline_run["mlflow"])
    versions = {v.tags["seekflow.trained_by"]: v for v in client.search_model_versions("name = 'seekflow-tiny'")}
    assert set(versions) == {"pretrain", "code_cpt", "long_context", "sft"}
    pretrain, code, extended = versions["pretrain"], versions["code_cpt"], versions["long_context"]
    assert versions["sft"].tags["seekflow.parent_version"] == extended.version   # V3: SFT after the extension
    assert "seekflow.eval.tasks.accuracy" in versions["sft"].tags
    assert pretrain.tags["seekflow.parent_version"] == "none"
    assert code.tags["seekflow.parent_version"] == pretrain.version
    assert extended.tags["seekflow.parent_version"] == pretrain.version
    for version in (code, extended):   # each was evaluated and gated on its own
        assert "seekflow.eval.perplexity.stdlib_code" in version.tags and "seekflow.promotion.decision" in version.tags
    assert float(extended.tags["seekflow.eval.perplexity.pos_64_256"]) > 1   # scored beyond the original context
