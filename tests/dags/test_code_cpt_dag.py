"""seekflow_code_cpt through `dag.test()` with the local backend, on the micro preset: it continues a release on a
corpus named in the trigger form; without a model to continue it stops in validate_config, before any job."""
from __future__ import annotations

import json

import pytest

from tests.support.code_cpt import PARENT_ARCHITECTURE, parent_release
from tests.support.mlflow_store import sqlite_store


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_code_cpt_dag_continues_a_release(dagbag, micro_corpus, one_process_run, tmp_path):
    parent = parent_release(one_process_run)
    key, value = PARENT_ARCHITECTURE.split("=")
    dagrun = dagbag["seekflow_code_cpt"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path), "code_cpt.train.steps": 2,
        "code_cpt.data_manifest": str(micro_corpus / "curate"), "code_cpt.init_checkpoint": str(parent),
        # knowledge CPT from the form: KSSM's objectives (an object field, validated against its schema)
        "code_cpt.kssm": {"span_weight": 1.0, "attention_weight": 0.1, "model_fraction": 0.1},
        "overrides": {f"code_cpt.{key}": int(value), "tracking.uri": sqlite_store(tmp_path)}})
    assert _states(dagrun) == {"validate_config": "success", "code_cpt": "success"}, _states(dagrun)
    manifest = json.loads((tmp_path / "code_cpt" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["outputs"]["parent"]["uri"] == str(parent)
    from tests.support.layouts import losses

    assert sorted(losses(tmp_path, "salient_attention_loss")) == [1, 2]   # the kssm loss ran


def test_code_cpt_dag_without_a_model_to_continue_fails_in_validate_config(dagbag, micro_corpus, tmp_path, capfd):
    # (explicitly unset: a DAG object keeps the Param values an earlier dag.test() in this process was given)
    dagrun = dagbag["seekflow_code_cpt"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path), "code_cpt.data_manifest": str(micro_corpus / "curate"),
        "code_cpt.init_checkpoint": None, "code_cpt.kssm": None})
    assert _states(dagrun) == {"validate_config": "failed", "code_cpt": "upstream_failed"}, _states(dagrun)
    out, err = capfd.readouterr()
    assert "code_cpt.init_checkpoint: no pretrain manifest at" in out + err
