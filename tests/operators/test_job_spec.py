"""TrainingJobOperator.build_spec: how a stage is launched is what its config class declares (`stage_spec`), for a
stage kind and for a further instance of one."""
from __future__ import annotations

import dataclasses

import pytest
import yaml


def spec_of(stage: str, overrides: dict | None = None, sharded: bool = False):
    from operators.job import TrainingJobOperator

    op = TrainingJobOperator(task_id=stage, stage=stage, sharded=sharded,
                             pipeline={"preset": "tiny", "overrides": {"run_root": "/tmp/r", **(overrides or {})}})
    return op.build_spec()


def test_each_stage_launches_as_its_config_declares():
    pretrain, evaluate, register = spec_of("pretrain"), spec_of("evaluate"), spec_of("register")
    assert (pretrain.stage, pretrain.launcher, pretrain.gpus_per_node) == ("pretrain", "torchrun", 0)
    assert (evaluate.launcher, evaluate.gpus_per_node) == ("torchrun", 1)   # one process on one GPU
    assert (register.launcher, register.gpus_per_node, register.shards) == ("python", 0, 1)
    assert yaml.safe_load(pretrain.config_yaml)["run_root"] == "/tmp/r"
    shards = spec_of("curate", {"curate.shards": 3}, sharded=True)
    assert (shards.launcher, shards.shards, shards.sharded) == ("python", 3, True)
    assert spec_of("curate", {"curate.shards": 3}).shards == 1   # the merge step is one process
    with pytest.raises(ValueError, match="stage pretrain has no shard phase"):
        spec_of("pretrain", sharded=True)


def test_the_launcher_is_read_from_the_config_class(monkeypatch):
    from training.config import RegisterConfig

    monkeypatch.setattr(RegisterConfig, "stage_spec",
                        dataclasses.replace(RegisterConfig.stage_spec, launcher="torchrun", gpus_per_node=1))
    assert (spec_of("register").launcher, spec_of("register").gpus_per_node) == ("torchrun", 1)


def test_a_further_instance_runs_its_kind_under_its_own_name():
    spec = spec_of("pretrain_more", {"pretrain_more.stage": "pretrain", "pretrain_more.train.steps": 30})
    config = yaml.safe_load(spec.config_yaml)
    assert (spec.stage, spec.launcher) == ("pretrain", "torchrun")   # `python -m training pretrain --config ...`
    assert (config["name"], config["train"]["steps"], config["run_root"]) == ("pretrain_more", 30, "/tmp/r")
    assert yaml.safe_load(spec_of("pretrain").config_yaml)["name"] is None   # the default instance: the kind


def test_each_stage_task_gets_its_kinds_retries_and_timeout():
    from datetime import timedelta

    import pendulum
    from airflow.sdk import DAG

    from operators.job import TrainingJobOperator, stage_jobs
    from training.config import STAGES

    pipeline = {"preset": "tiny"}
    with DAG("stage_defaults", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
        jobs = {kind: stage_jobs(kind, pipeline) for kind in STAGES}
        [more] = stage_jobs("pretrain_more", pipeline, kind="pretrain")
    for kind, cls in STAGES.items():
        for op in jobs[kind]:
            assert op.retries == cls.stage_spec.retries >= 1, kind
            assert op.execution_timeout == timedelta(minutes=cls.stage_spec.timeout_minutes), kind
            assert op.retry_delay == timedelta(minutes=cls.stage_spec.retry_delay_minutes), kind
    # Training runs for days, promotion for minutes.
    assert STAGES["pretrain"].stage_spec.timeout_minutes > 24 * 60 > STAGES["promote"].stage_spec.timeout_minutes
    assert more.retries == STAGES["pretrain"].stage_spec.retries

    mine = TrainingJobOperator(task_id="p", stage="pretrain", pipeline=pipeline, retries=0,
                               execution_timeout=timedelta(hours=1))
    assert (mine.retries, mine.execution_timeout) == (0, timedelta(hours=1))   # the DAG author's word wins
    via_defaults = TrainingJobOperator(task_id="q", stage="pretrain", pipeline=pipeline,
                                       default_args={"retries": 7, "retry_delay": timedelta(seconds=1)})
    assert (via_defaults.retries, via_defaults.retry_delay) == (7, timedelta(seconds=1))
    assert via_defaults.execution_timeout == timedelta(minutes=STAGES["pretrain"].stage_spec.timeout_minutes)


def test_dag_default_args_win_over_the_stage_defaults():
    from datetime import timedelta

    import pendulum
    from airflow.sdk import DAG

    from operators.job import stage_jobs
    from operators.params import VALIDATE_TASK_DEFAULTS, validate_config

    with DAG("defaults_test", schedule=None, start_date=pendulum.datetime(2026, 1, 1),
             default_args={"retries": 0, "execution_timeout": timedelta(minutes=3)}):
        config = validate_config(("promote.gates",), ("promote",))
        [promote] = stage_jobs("promote", config)
    assert (promote.retries, promote.execution_timeout) == (0, timedelta(minutes=3))
    assert promote.retry_delay == timedelta(minutes=1)   # not in default_args: the stage's
    validate = config.operator
    assert (validate.retries, validate.execution_timeout) == (0, timedelta(minutes=3))
    assert validate.retry_delay == VALIDATE_TASK_DEFAULTS["retry_delay"]
