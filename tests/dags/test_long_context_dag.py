"""seekflow_long_context through `dag.test()` with the local backend, on the micro preset: it extends a release named
in the trigger form, phase after phase; a phase that cannot fit stops in validate_config, before any job, naming the
field."""
from __future__ import annotations

import json

import pytest

from tests.support.mlflow_store import sqlite_store


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.mark.slow
def test_long_context_dag_extends_a_release(dagbag, micro_corpus, one_process_run, tmp_path):
    parent = one_process_run / "pretrain" / "release"
    dagrun = dagbag["seekflow_long_context"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path), "long_context.data_manifest": str(micro_corpus / "curate"),
        "long_context.init_checkpoint": str(parent), "overrides": {"tracking.uri": sqlite_store(tmp_path)}})
    assert _states(dagrun) == {"validate_config": "success", "long_context": "success"}, _states(dagrun)
    manifest = json.loads((tmp_path / "long_context" / "manifest.json").read_text())
    assert manifest["outputs"]["release_checkpoint"] == str(tmp_path / "long_context" / "phase_1" / "release")
    assert [p["seq_length"] for p in manifest["outputs"]["phases"]] == [64, 128]
    assert manifest["outputs"]["parent"]["uri"] == str(parent)


TOO_LONG = [{"seq_length": 256, "factor": 4, "steps": 1, "global_batch_size": 2, "lr": 3e-4}]   # micro: 32 x 4


def test_a_phase_that_cannot_fit_stops_the_run_in_validate_config(dagbag, micro_corpus, tmp_path):
    dagrun = dagbag["seekflow_long_context"].test(run_conf={
        "profile": "micro", "run_root": str(tmp_path), "long_context.data_manifest": str(micro_corpus / "curate"),
        "long_context.phases": TOO_LONG})
    assert _states(dagrun) == {"validate_config": "failed", "long_context": "upstream_failed"}, _states(dagrun)


@pytest.mark.parametrize("conf, reason", [
    ({"long_context.phases": TOO_LONG},
     "long_context.phases.0.seq_length: 256 tokens is longer than the original context x s (32 x 4 = 128)"),
    ({"long_context.parallel.context_parallel_size": 3},
     "long_context.phases.0.seq_length: 64 is not divisible by 2 x parallel.context_parallel_size (6)"),
    ({}, "long_context.init_checkpoint: no code_cpt manifest at"),   # the chain's reads: {pretrain: code_cpt}
])
def test_validate_config_names_the_field(dagbag, micro_corpus, tmp_path, conf, reason):
    """The DAG's validate_config task on its own (its message, which a second failing dag.test in one process
    does not show on the captured output: Airflow's loggers keep the first test's stdout)."""
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag["seekflow_long_context"]
    params = {key: param.value for key, param in dag.params.items()}
    params.update({"profile": "micro", "run_root": str(tmp_path),
                   "long_context.data_manifest": str(micro_corpus / "curate"), **conf})
    with pytest.raises(AirflowFailException) as failed:
        dag.get_task("validate_config").python_callable(params=params, dag=dag, run_id="manual__test")
    assert reason in str(failed.value)
