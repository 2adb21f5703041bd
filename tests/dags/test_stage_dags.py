"""The stage DAGs on their own: seekflow_curate builds a corpus, seekflow_pretrain trains on it, seekflow_evaluate
scores the end-to-end pipeline's release, each through `dag.test()` with the local backend; bad input stops at the
form or at validate_config, before any job."""
from __future__ import annotations

import json

import pytest

SMALL_SOURCES = [{"kind": "package_metadata", "max_documents": 20}, {"kind": "package_code", "max_documents": 20}]


@pytest.fixture(scope="module")
def dags(dagbag):
    return dagbag


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


def test_a_conf_outside_the_schema_starts_no_run(dags):
    from airflow.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=r"pretrain\.train\.steps: 0 is less than the minimum of 1"):
        dags["seekflow_pretrain"].test(run_conf={"pretrain.train.steps": 0})


@pytest.mark.slow
def test_pretrain_without_a_corpus_fails_in_validate_config(dags, tmp_path, capfd):
    dagrun = dags["seekflow_pretrain"].test(run_conf={"run_root": str(tmp_path)})
    assert _states(dagrun) == {"validate_config": "failed", "pretrain": "upstream_failed"}, _states(dagrun)
    out, err = capfd.readouterr()
    assert "pretrain.data_manifest: no curate manifest at" in out + err


@pytest.mark.slow
def test_curate_then_pretrain_then_evaluate_as_separate_dags(dags, pipeline_run, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_run["mlflow"])
    curated = dags["seekflow_curate"].test(run_conf={"curate.sources": SMALL_SOURCES,
                                                     "run_root": str(tmp_path / "curate_run")})
    assert _states(curated) == {"validate_config": "success", "curate_shards": "success", "curate": "success"}, \
        _states(curated)
    manifest = tmp_path / "curate_run" / "curate" / "manifest.json"
    assert json.loads(manifest.read_text())["stage"] == "curate"

    trained = dags["seekflow_pretrain"].test(run_conf={
        "pretrain.data_manifest": str(manifest), "pretrain.train.steps": 2, "pretrain.optimizer.warmup_steps": 1,
        "pretrain.train.seq_length": 32, "pretrain.train.log_interval": 1, "pretrain.train.save_interval": 2,
        "run_root": str(tmp_path / "train_run")})
    assert _states(trained) == {"validate_config": "success", "pretrain": "success"}, _states(trained)
    result = json.loads((tmp_path / "train_run" / "pretrain" / "manifest.json").read_text())
    assert result["inputs"]["data_manifest_hash"] and result["result"]["final_loss"] > 0

    release = pipeline_run["run_root"] / "pretrain" / "release"   # 10 steps: a model that has learnt a little
    evaluated = dags["seekflow_evaluate"].test(run_conf={
        "evaluate.checkpoint": str(release), "evaluate.humaneval.max_problems": 2, "evaluate.fim.num_spans": 4,
        "evaluate.arith.num_problems": 4, "run_root": str(tmp_path / "eval_run"),
        "overrides": {"evaluate.passkey.context_lengths": [128], "evaluate.passkey.depths": [0.5],
                      "evaluate.perplexity.max_documents": 4, "evaluate.perplexity.max_tokens": 256}})
    assert _states(evaluated) == {"validate_config": "success", "evaluate": "success"}, _states(evaluated)
    scores = json.loads((tmp_path / "eval_run" / "evaluate" / "manifest.json").read_text())["metrics"]
    assert scores["perplexity.stdlib_code"] > 1 and 0 <= scores["humaneval.pass_at_1"] <= 1


@pytest.mark.slow
def test_promote_dag_refuses_a_model_that_does_not_exist(dags, mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    dagrun = dags["seekflow_promote"].test(run_conf={"promote.model_name": "seekflow-nothing",
                                                      "run_root": str(tmp_path)})
    assert _states(dagrun) == {"validate_config": "success", "promote": "failed"}, _states(dagrun)
    # Bad input (training/__main__.py prints SEEKFLOW_FAILURE): failed on its first try, not retried.
    assert dagrun.get_task_instance("promote").try_number == 1
