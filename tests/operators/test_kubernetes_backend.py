"""KubernetesBackend, JobCompletionTrigger and the deferrable TrainingJobOperator against a loopback fake API server.

Nothing of ours is mocked: the operator builds and validates the real stage config, `k8s_render` renders the real
manifest, the provider's KubernetesHook reads the Airflow connection, and the kubernetes client talks HTTP to
`fake_kube.FakeKube`, which answers with the real API's paths and shapes.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import structlog

from operators.backends import JobFailed, JobSpec, get_backend
from operators.backends.k8s_render import job_name, render
from operators.backends.k8s_settings import KubernetesSettings
from operators.backends.kubernetes import KubernetesApiError, KubernetesBackend
from tests.support.fake_kube import FakeKube, Outcome

NS = "seekflow"
FAST = {"namespace": NS, "poll_interval_s": 0.05, "pending_timeout_s": 1.0}
RESULT = 'SEEKFLOW_RESULT {"final_loss": 1.25, "checkpoint": "s3://ckpt/release"}'


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A fresh fake cluster per test, reached through the `kubernetes_default` Airflow connection."""
    fake = FakeKube().start()
    cfg = fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(cfg)}}))
    monkeypatch.delenv("SEEKFLOW_K8S_SETTINGS", raising=False)
    yield fake
    fake.stop()


def backend(**settings) -> KubernetesBackend:
    return KubernetesBackend(KubernetesSettings(**{**FAST, **settings}), backoff_s=0.01, request_timeout_s=5)


def spec(launcher: str = "torchrun", try_number: int = 1, **kw) -> JobSpec:
    labels = {"dag_id": "seekflow_pipeline", "task_id": "pretrain", "run_id": "manual__2026-01-01T00:00:00+00:00",
              "try_number": str(try_number)}
    return JobSpec(stage="pretrain" if launcher == "torchrun" else "curate", config_yaml="train: {steps: 1}\n",
                   launcher=launcher, nodes=2 if launcher == "torchrun" else 1, labels=labels, **kw)


def context(task_id: str = "pretrain", try_number: int = 1) -> dict:
    ti = SimpleNamespace(dag_id="seekflow_pipeline", task_id=task_id, run_id="manual__2026-01-01T00:00:00+00:00",
                         try_number=try_number, map_index=-1)
    return {"ti": ti, "run_id": ti.run_id}


def operator(stage: str = "pretrain", deferrable: bool = True, task: dict | None = None, **settings):
    from operators.job import TrainingJobOperator

    return TrainingJobOperator(task_id=stage, stage=stage, backend="kubernetes",
                               pipeline={"preset": "tiny", "overrides": {"run_root": "s3://seekflow/runs/test"}},
                               nodes=2 if stage == "pretrain" else 1, deferrable=deferrable,
                               kubernetes={**FAST, **settings}, poll_backoff_s=0.01, **(task or {}))


def defer(op, ctx):
    """execute() must defer to our trigger; returns the trigger re-created from its serialized form."""
    from airflow.sdk.exceptions import TaskDeferred
    from airflow.sdk import serde
    from airflow.sdk.module_loading import import_string

    from operators.triggers import JobCompletionTrigger

    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    assert deferred.value.method_name == "execute_complete"
    classpath, kwargs = deferred.value.trigger.serialize()
    assert classpath == "operators.triggers.JobCompletionTrigger"
    kwargs = serde.deserialize(json.loads(json.dumps(serde.serialize(kwargs))))   # what the task runner stores
    trigger = import_string(classpath)(**kwargs)
    assert isinstance(trigger, JobCompletionTrigger)
    return trigger


def first_event(trigger, timeout: float = 20) -> dict:
    async def go():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(asyncio.wait_for(go(), timeout))


def complete(op, ctx, event) -> tuple[dict | BaseException, list[str]]:
    """execute_complete, capturing what it writes to the task log."""
    with structlog.testing.capture_logs() as logs:
        try:
            out = op.execute_complete(ctx, event)
        except Exception as exc:   # noqa: BLE001 - returned for the test to assert on
            out = exc
    return out, log_lines(logs)


def log_lines(captured: list[dict]) -> list[str]:
    return [e["event"] % e["positional_args"] if e.get("positional_args") else e["event"] for e in captured]


# ---- the deferrable operator, end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("action", ["delete", "keep"])
def test_submit_defer_succeed_logs_and_cleanup(fake, action):
    fake.outcome = Outcome.succeed(["step 1 loss 2.0", "50% done {not a format}", RESULT])
    op, ctx = operator(on_finish_action=action), context()
    trigger = defer(op, ctx)
    [post] = fake.calls("create", "jobsets")
    assert post.body["kind"] == "JobSet" and post.body["metadata"]["name"] == trigger.name
    event = first_event(trigger)
    assert event["status"] == "succeeded" and event["name"] == trigger.name
    result, lines = complete(op, ctx, event)
    assert result == {"final_loss": 1.25, "checkpoint": "s3://ckpt/release"}
    assert "50% done {not a format}" in lines and RESULT in lines
    deleted = fake.calls("delete", "jobsets")
    if action == "delete":
        [delete] = deleted
        assert delete.query.get("propagationPolicy") == "Background"
        # The decision record: logs were read before the delete.
        last_log = max(i for i, r in enumerate(fake.requests) if r.resource == "pods/log")
        assert last_log < fake.requests.index(delete)
        assert not fake.objects and not fake.pods
    else:
        assert not deleted and (("jobsets", NS, trigger.name) in fake.objects)


def test_python_stage_runs_as_an_indexed_job(fake):
    fake.outcome = Outcome.succeed(['SEEKFLOW_RESULT {"documents": 12}'])
    op, ctx = operator("curate"), context("curate")
    trigger = defer(op, ctx)
    [post] = fake.calls("create", "jobs")
    assert post.body["spec"]["completionMode"] == "Indexed" and trigger.kind == "Job"
    result, _ = complete(op, ctx, first_event(trigger))
    assert result == {"documents": 12}
    assert fake.count("delete", "jobs") == 1


@pytest.mark.parametrize("bad_input", [False, True])   # True: the job said so (SEEKFLOW_FAILURE): no retries
def test_failed_job_fails_the_task_with_the_pods_last_lines(fake, bad_input):
    from airflow.exceptions import AirflowFailException

    said = ['SEEKFLOW_FAILURE {"error": "RegistryError: no alias"}'] if bad_input else []
    fake.outcome = Outcome.fail(exit_code=3, lines=["step 7 loss nan", *said, "RuntimeError: loss is NaN at step 7"])
    op, ctx = operator(), context()
    event = first_event(defer(op, ctx))
    assert event["status"] == "failed" and event["reason"] == "FailedJobs"
    err, lines = complete(op, ctx, event)
    assert isinstance(err, AirflowFailException if bad_input else JobFailed)
    assert "RuntimeError: loss is NaN at step 7" in str(err) and "FailedJobs" in str(err)
    assert "RuntimeError: loss is NaN at step 7" in lines   # and the log is in the task log
    assert fake.count("delete", "jobsets") == 1


def test_restart_mid_wait_reattaches_without_a_second_post(fake):
    fake.outcome = Outcome.succeed([RESULT], after_s=None)   # runs until we say so
    ctx = context()
    first = defer(operator(), ctx)
    # The worker dies; the same try starts again on another worker: same name, no second POST.
    again = defer(operator(), ctx)
    assert again.name == first.name and fake.count("create", "jobsets") == 1
    # The triggerer restarts mid-wait: the trigger is re-created from its kwargs and keeps waiting.
    async def poll_once_then_cancel():
        task = asyncio.ensure_future(first.run().__anext__())
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
    asyncio.run(poll_once_then_cancel())
    fake.finish("jobsets", NS, first.name)
    op = operator()
    result, _ = complete(op, ctx, first_event(again))
    assert result["final_loss"] == 1.25
    assert fake.count("create", "jobsets") == 1


def test_a_retry_waits_for_the_still_running_job_of_an_earlier_try(fake):
    fake.outcome = Outcome.succeed([RESULT], after_s=None)
    first = defer(operator(), context(try_number=1))
    retry = defer(operator(), context(try_number=2))
    assert retry.name == first.name and fake.count("create", "jobsets") == 1


def test_a_retry_after_a_failed_try_submits_a_new_job(fake):
    fake.outcome = Outcome.fail()
    b = backend(on_finish_action="keep")
    h1 = b.submit(spec(try_number=1))
    assert b.wait(h1, log=lambda line: None)["status"] == "failed"   # kept, but finished: not reattached
    h2 = backend().submit(spec(try_number=2))
    assert h2.name != h1.name and fake.count("create", "jobsets") == 2


def test_on_kill_deletes_the_job(fake):
    fake.outcome = Outcome.succeed(after_s=None)
    op, ctx = operator(on_finish_action="keep"), context()
    trigger = defer(op, ctx)
    op.on_kill()   # killed between submit and defer, or while execute_complete collects logs
    assert fake.count("delete", "jobsets") == 1 and not fake.objects
    # A user kill while deferred reaches the trigger (Airflow >= 3.3: BaseTrigger.on_kill).
    fake.outcome = Outcome.succeed(after_s=None)
    trigger2 = defer(operator(), context(try_number=2))
    asyncio.run(trigger2.on_kill())
    assert fake.count("delete", "jobsets") == 2 and not fake.objects
    assert trigger.name != trigger2.name


def test_non_deferrable_run_waits_in_the_worker(fake):
    fake.outcome = Outcome.succeed(["hello", RESULT])
    op, ctx = operator("curate", deferrable=False), context("curate")
    with structlog.testing.capture_logs() as logs:
        result = op.execute(ctx)
    assert result["final_loss"] == 1.25
    assert "hello" in log_lines(logs)
    assert fake.count("create", "jobs") == 1 and fake.count("delete", "jobs") == 1


# ---- faults -----------------------------------------------------------------------------------------------------

def test_409_on_create_reattaches(fake):
    """Another worker creates the job between our existence check and our POST: we get a 409 and wait for it."""
    fake.outcome = Outcome.succeed([RESULT])
    settings = KubernetesSettings(**FAST)
    manifest = render(spec(), settings)
    path = f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets"
    fake.after("list", "jobsets", lambda: fake.handle("POST", path, {}, manifest))   # the other worker's POST
    b = backend()
    handle = b.submit(spec())
    assert handle.name == manifest["metadata"]["name"]
    assert fake.codes("create", "jobsets") == [201, 409] and len(fake.objects) == 1
    lines: list[str] = []
    assert b.finish(handle, b.wait(handle, lines.append), lines.append)["final_loss"] == 1.25


def test_403_names_the_verb_and_the_resource(fake):
    fake.inject("create", "jobsets", 403)
    with pytest.raises(KubernetesApiError, match="forbidden: cannot create jobsets.jobset.x-k8s.io in namespace "
                                                 "seekflow — check the RBAC Role in k8s/platform"):
        backend().submit(spec())
    fake.inject("list", "pods", 403)
    handle = backend().submit(spec(try_number=2))
    with pytest.raises(KubernetesApiError, match="cannot list pods in namespace seekflow"):
        backend().poll(handle)


def test_5xx_twice_then_success_is_retried(fake):
    fake.inject("create", "jobsets", 503, times=2)
    fake.inject("get", "jobsets", 500, times=1)
    handle = backend().submit(spec())
    assert fake.codes("create", "jobsets") == [503, 503, 201] and len(fake.objects) == 1
    assert handle.name == job_name(spec())


def test_5xx_forever_gives_up_after_bounded_attempts(fake):
    from kubernetes.client.exceptions import ApiException

    fake.inject("create", "jobsets", 500, times=100)
    with pytest.raises(ApiException) as err:
        KubernetesBackend(KubernetesSettings(**FAST), api_attempts=3, backoff_s=0.01).submit(spec())
    assert err.value.status == 500 and fake.count("create", "jobsets") == 3


def test_a_timed_out_create_that_reached_the_server_reattaches(fake):
    fake.inject("create", "jobsets", 0, delay_s=1.5)   # created, but the answer comes too late
    b = KubernetesBackend(KubernetesSettings(**FAST), backoff_s=0.01, request_timeout_s=0.5)
    handle = b.submit(spec())
    assert fake.codes("create", "jobsets") == [201, 409] and len(fake.objects) == 1
    assert handle.name == job_name(spec())


@pytest.mark.parametrize("reason,expect", [("Unschedulable", "Insufficient nvidia.com/gpu"),
                                           ("ErrImagePull", "Failed to pull image")])
def test_pending_beyond_the_timeout_fails_with_the_events(fake, reason, expect):
    fake.outcome = Outcome.pending(reason)
    op, ctx = operator(on_finish_action="keep"), context()
    event = first_event(defer(op, ctx))
    assert event["status"] == "failed" and event["reason"] == "PendingTimeout"
    assert expect in event["message"] and reason in event["message"]
    err, lines = complete(op, ctx, event)
    assert isinstance(err, JobFailed) and expect in str(err)
    assert any(expect in line for line in lines)
    assert not fake.objects   # never ran: deleted even with keep, so a retry does not reattach to it


def test_invalid_config_never_reaches_the_api(fake):
    from pydantic import ValidationError
    from training.config.loader import ConfigError

    from operators.job import TrainingJobOperator

    bad = TrainingJobOperator(task_id="pretrain", stage="pretrain", backend="kubernetes", kubernetes=FAST,
                              pipeline={"preset": "tiny", "overrides": {"pretrain.model.num_layers": -3}})
    with pytest.raises(ConfigError, match="num_layers"):
        bad.execute(context())
    with pytest.raises(ValidationError, match="namespace"):
        operator(namespace="Not_A_Namespace").execute(context())
    assert fake.requests == []


def test_a_local_run_root_never_reaches_the_api(fake, tmp_path):
    from operators.job import TrainingJobOperator

    op = TrainingJobOperator(task_id="curate", stage="curate", backend="kubernetes", kubernetes=FAST,
                             pipeline={"preset": "tiny", "overrides": {"run_root": str(tmp_path)}})
    with pytest.raises(ValueError, match=r"not shared by the job's pods; on the kubernetes backend use an s3://"):
        op.execute(context("curate"))
    assert fake.requests == []


def test_default_run_root_follows_the_cluster_base(monkeypatch):
    from operators.job import default_run_root

    monkeypatch.setenv("SEEKFLOW_RUN_ROOT_BASE", "s3://seekflow/runs/")
    assert default_run_root("seekflow_pipeline", "manual__2026-01-01T00:00:00+00:00") == \
        "s3://seekflow/runs/seekflow_pipeline/manual__2026-01-01T00_00_00_00_00"


def test_get_backend_knows_kubernetes():
    assert isinstance(get_backend("kubernetes", settings=KubernetesSettings(**FAST)), KubernetesBackend)


def test_a_trigger_poll_error_is_retried(fake):
    fake.outcome = Outcome.succeed([RESULT], after_s=0.3)
    op, ctx = operator(), context()
    trigger = defer(op, ctx)
    fake.inject("get", "jobsets", 503, times=2)
    submitted = fake.count("get", "jobsets")   # the submit's existence check
    event = first_event(trigger)
    assert event["status"] == "succeeded", event
    assert fake.codes("get", "jobsets")[submitted:][:3] == [503, 503, 200] and fake.count("delete", "jobsets") == 0
    result, _ = complete(op, ctx, event)
    assert result["final_loss"] == 1.25


def test_persistent_poll_errors_fail_the_task_and_delete_the_job(fake):
    """The job must not run on without an owner: after the retries the trigger deletes it, then fails the task."""
    fake.outcome = Outcome.succeed(after_s=None)   # would run forever
    op, ctx = operator(task={"poll_attempts": 3}), context()
    trigger = defer(op, ctx)
    assert (trigger.poll_attempts, trigger.poll_backoff_s) == (3, 0.01)   # carried through serialization
    fake.inject("get", "jobsets", 503, times=100)
    submitted = fake.count("get", "jobsets")
    event = first_event(trigger)
    assert event["status"] == "error" and event["deleted"] is True, event
    assert fake.count("get", "jobsets") - submitted == 3 and fake.count("delete", "jobsets") == 1 and not fake.objects
    assert f"deleted JobSet {NS}/{trigger.name}" in event["message"]
    err, _ = complete(op, ctx, event)
    assert isinstance(err, KubernetesApiError) and "503" in str(err)
    assert fake.count("delete", "jobsets") == 1   # the worker does not delete twice


def test_a_forbidden_poll_is_not_retried_and_a_failed_delete_is_retried_by_the_worker(fake):
    fake.outcome = Outcome.succeed(after_s=None)
    op, ctx = operator(), context()
    trigger = defer(op, ctx)
    fake.inject("get", "jobsets", 403)
    fake.inject("delete", "jobsets", 403)   # RBAC refuses the trigger's delete as well
    submitted = fake.count("get", "jobsets")
    event = first_event(trigger)
    assert event["status"] == "error" and "cannot get jobsets.jobset.x-k8s.io" in event["message"]
    assert event["deleted"] is False and "deleting" in event["message"] and "failed too" in event["message"]
    assert fake.count("get", "jobsets") - submitted == 1 and len(fake.objects) == 1
    err, _ = complete(op, ctx, event)   # execute_complete deletes it from the worker
    assert isinstance(err, KubernetesApiError) and "forbidden" in str(err)
    assert fake.codes("delete", "jobsets") == [403, 200] and not fake.objects


def test_the_trigger_enforces_the_execution_timeout(fake):
    """Airflow does not time a deferred task; the trigger fails the job at the deadline, logs first, then delete."""
    from datetime import timedelta

    fake.outcome = Outcome.succeed(after_s=None)
    op, ctx = operator(on_finish_action="keep", task={"execution_timeout": timedelta(seconds=0.5)}), context()
    trigger = defer(op, ctx)
    assert trigger.deadline == pytest.approx(trigger.started_at + 0.5)
    event = first_event(trigger)
    assert (event["status"], event["reason"]) == ("failed", "Timeout") and "execution_timeout" in event["message"]
    err, lines = complete(op, ctx, event)
    assert isinstance(err, JobFailed) and "execution_timeout (0:00:00.500000)" in str(err)
    assert any(line.startswith("----- JobSet") for line in lines)
    [delete] = fake.calls("delete", "jobsets")   # even with keep: nothing runs past its timeout
    assert max(i for i, r in enumerate(fake.requests) if r.resource == "pods/log") < fake.requests.index(delete)
    assert not fake.objects


@pytest.mark.slow
def test_pipeline_dag_defers_and_resumes_through_airflow(fake, dagbag, monkeypatch, tmp_path):
    """Airflow's own defer → trigger → execute_complete path (`dag.test()` runs triggers inline), every stage a job."""
    settings = tmp_path / "k8s-settings.yaml"
    settings.write_text(json.dumps(FAST))   # YAML is a superset of JSON
    monkeypatch.setenv("SEEKFLOW_K8S_SETTINGS", str(settings))
    fake.outcome = Outcome.succeed([RESULT])
    dagrun = dagbag["seekflow_pipeline"].test(run_conf={"backend": "kubernetes",
                                                        "run_root": "s3://seekflow/runs/dag-test"})
    states = {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}
    from training.config import PIPELINE_CHAIN

    chain = ("validate_config", "curate_shards", "curate_code_shards", *PIPELINE_CHAIN)
    assert states == {t: "success" for t in chain}, states
    # curate shards + merge (twice), register and promote (four times each) as Jobs; the training and evaluate
    # stages (pretrain, code_cpt, long_context, sft and their four evaluations: GPU stages) as JobSets
    assert fake.count("create", "jobs") == 12 and fake.count("create", "jobsets") == 8
    assert fake.count("delete", "jobs") == 12 and fake.count("delete", "jobsets") == 8 and not fake.objects
    labels = fake.calls("create", "jobsets")[0].body["metadata"]["annotations"]
    assert labels["seekflow.io/run-id"] == dagrun.run_id and labels["seekflow.io/try-number"] == "1"
