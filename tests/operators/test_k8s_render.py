"""What the Kubernetes backend submits: the pretrain JobSet (2 nodes x 8 GPUs), the curate Indexed Job, job names and
labels, and no secret value anywhere. Schema validation of the same manifests lives in tests/k8s/."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from pydantic import ValidationError

from operators.backends.base import JobSpec
from operators.backends.k8s_render import job_labels, job_name, render
from operators.backends.k8s_settings import KubernetesSettings
from tests.support.k8s import REPO, expand_k8s_vars

OWNER = {"dag_id": "seekflow_pipeline", "task_id": "pretrain", "run_id": "manual__2026-01-01T00:00:00+00:00",
         "try_number": "1"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
FAKE_SECRET = "s3cr3t-Value-that-must-never-appear-0xC0FFEE"


def pretrain_spec(**changes) -> JobSpec:
    fields = dict(stage="pretrain", config_yaml="train:\n  steps: 10\n", launcher="torchrun", nodes=2,
                  procs_per_node=8, gpus_per_node=8, labels=dict(OWNER))
    return JobSpec(**{**fields, **changes})


def curate_spec(**changes) -> JobSpec:
    fields = dict(stage="curate", config_yaml="max_reject_ratio: 0.5\n", launcher="python", shards=4, sharded=True,
                  labels={**OWNER, "task_id": "curate"})
    return JobSpec(**{**fields, **changes})


SETTINGS = KubernetesSettings(image_pull_secrets=["regcred"], node_selector={"nvidia.com/gpu.product": "H100"})


def pod_of(manifest: dict) -> dict:
    spec = manifest["spec"]
    if manifest["kind"] == "JobSet":
        spec = spec["replicatedJobs"][0]["template"]["spec"]
    return spec["template"]["spec"]


def env_of(manifest: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod_of(manifest)["containers"][0]["env"]}


# -- the pretrain JobSet ---------------------------------------------------------------------------------------------

def test_pretrain_jobset_runs_torchrun_on_2_nodes_of_8_gpus():
    js = render(pretrain_spec(), SETTINGS)
    name = job_name(pretrain_spec())
    assert (js["apiVersion"], js["kind"], js["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", name)
    [rjob] = js["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (2, 2, "Indexed", 0)

    cmd = pod_of(js)["containers"][0]["command"]
    assert cmd[0] == "torchrun"
    launcher, training = cmd[:cmd.index("-m")], cmd[cmd.index("-m"):]
    assert "--nnodes=2" in launcher and "--nproc-per-node=8" in launcher
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in launcher   # Kubernetes expands it from the Indexed Job's env
    assert "--rdzv-backend=static" in launcher and "--max-restarts=0" in launcher
    # The leader pod's stable DNS name, as the JobSet CRD documents it:
    # <jobSet.name>-<spec.replicatedJob.name>-<job-index>-<pod-index>.<subdomain>, subdomain = the JobSet name.
    leader = f"{name}-node-0-0.{name}"
    assert f"--master-addr={leader}" in launcher and "--master-port=29500" in launcher
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name}
    assert js["spec"]["coordinator"] == {"replicatedJob": "node", "jobIndex": 0, "podIndex": 0}
    assert training == ["-m", "training", "pretrain", "--config", "env:SEEKFLOW_STAGE_CONFIG"]
    assert env_of(js)["SEEKFLOW_STAGE_CONFIG"] == pretrain_spec().config_yaml


def test_pretrain_pods_get_gpus_tolerations_shm_scratch_and_pull_secrets():
    js = render(pretrain_spec(), SETTINGS)
    pod = pod_of(js)
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes[mounts["/scratch"]]["emptyDir"] == {"sizeLimit": "200Gi"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["image"] == SETTINGS.image
    assert container["envFrom"] == [{"secretRef": {"name": "seekflow-env"}},
                                    {"secretRef": {"name": "seekflow-mlflow-jobs"}}]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "seekflow-job"
    assert js["spec"]["failurePolicy"] == {"maxRestarts": 3}


def test_labels_on_jobset_job_and_pods():
    js = render(pretrain_spec(), SETTINGS)
    labels = job_labels(pretrain_spec())
    rjob = js["spec"]["replicatedJobs"][0]["template"]
    assert js["metadata"]["labels"] == rjob["metadata"]["labels"] == rjob["spec"]["template"]["metadata"]["labels"]
    assert js["metadata"]["labels"] == labels
    assert labels["app.kubernetes.io/part-of"] == "seekflow" and labels["seekflow.io/stage"] == "pretrain"
    assert labels["seekflow.io/job"] == js["metadata"]["name"]
    assert js["metadata"]["annotations"]["seekflow.io/run-id"] == OWNER["run_id"]   # exact value kept


def test_scratch_can_be_an_ephemeral_volume_of_a_storage_class():
    settings = KubernetesSettings(scratch_storage_class="local-nvme", scratch_size="1Ti", scratch_mount="/nvme")
    pod = pod_of(render(pretrain_spec(), settings))
    [scratch] = [v for v in pod["volumes"] if v["name"] == "scratch"]
    claim = scratch["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "local-nvme" and claim["resources"]["requests"]["storage"] == "1Ti"
    assert {"name": "scratch", "mountPath": "/nvme"} in pod["containers"][0]["volumeMounts"]
    assert env_of(render(pretrain_spec(), settings))["TMPDIR"] == "/nvme"


def test_gpus_and_processes_default_from_settings_and_cpu_clusters_get_no_gpu():
    js = render(pretrain_spec(gpus_per_node=0, procs_per_node=1), KubernetesSettings(gpus_per_node=4))
    assert "--nproc-per-node=4" in pod_of(js)["containers"][0]["command"]
    cpu = render(pretrain_spec(gpus_per_node=0, procs_per_node=2), KubernetesSettings(gpus_per_node=0))
    pod = pod_of(cpu)
    assert "--nproc-per-node=2" in pod["containers"][0]["command"]
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"]) and "tolerations" not in pod
    with pytest.raises(ValueError, match="16 processes per node but only 8 GPUs"):
        render(pretrain_spec(procs_per_node=16), SETTINGS)


# -- the curate Indexed Job ------------------------------------------------------------------------------------------

def test_curate_is_a_cpu_indexed_job_with_one_pod_per_shard():
    job = render(curate_spec(), SETTINGS)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == SETTINGS.shard_backoff_limit
    pod = pod_of(job)
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "training", "curate", "--config", "env:SEEKFLOW_STAGE_CONFIG"]
    assert "gpu" not in json.dumps(container["resources"]) and "tolerations" not in pod
    assert "nodeSelector" not in pod   # the GPU node selector is not for data shards
    env = env_of(job)
    assert "JOB_COMPLETION_INDEX" not in env   # Kubernetes sets it per pod; nothing may override it
    assert env["SEEKFLOW_NUM_SHARDS"] == "4" and env["SEEKFLOW_STAGE_CONFIG"] == curate_spec().config_yaml
    assert container["envFrom"] == [{"secretRef": {"name": "seekflow-env"}},
                                    {"secretRef": {"name": "seekflow-mlflow-jobs"}}]
    assert job["metadata"]["labels"] == pod_of_labels(job) == job_labels(curate_spec())


def test_the_merge_after_the_shards_is_one_pod_without_a_shard_count():
    job = render(curate_spec(shards=1, sharded=False), SETTINGS)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert "SEEKFLOW_NUM_SHARDS" not in env_of(job)   # so the stage merges instead of running shard 0
    with pytest.raises(ValueError, match="not a shard phase"):
        render(curate_spec(sharded=False), SETTINGS)


def pod_of_labels(job: dict) -> dict:
    return job["spec"]["template"]["metadata"]["labels"]


def test_launchers_refuse_the_other_kind_of_scale():
    with pytest.raises(ValueError, match="shards, not nodes"):
        render(curate_spec(nodes=2), SETTINGS)
    with pytest.raises(ValueError, match="nodes, not shards"):
        render(pretrain_spec(shards=3), SETTINGS)
    with pytest.raises(ValueError, match="unknown launcher"):
        render(pretrain_spec(launcher="mpirun"), SETTINGS)


# -- names and labels -------------------------------------------------------------------------------------------------

def test_job_name_is_deterministic_short_and_distinct_per_try_and_run():
    name = job_name(pretrain_spec())
    assert name == job_name(pretrain_spec()) == job_name(pretrain_spec(config_yaml="other: 1\n"))   # reattach
    assert DNS_1035.match(name) and name.startswith("sf-pretrain-")
    # JobSet's webhook: <name>-node-<jobIdx>-<podIdx> plus a 5-character suffix must stay within 63 characters.
    assert len(f"{name}-node-0-9999-abcde") <= 63
    others = {job_name(pretrain_spec(labels={**OWNER, "try_number": "2"})),
              job_name(pretrain_spec(labels={**OWNER, "run_id": "manual__2026-01-02T00:00:00+00:00"})),
              job_name(pretrain_spec(labels={**OWNER, "task_id": "pretrain_2"})),
              job_name(curate_spec(labels=dict(OWNER)))}
    assert name not in others and len(others) == 4


def test_job_name_of_long_or_odd_stage_names_stays_valid():
    for stage in ("long_context", "post_train", "A" * 80, "__weird__stage__"):
        name = job_name(pretrain_spec(stage=stage))
        assert DNS_1035.match(name) and len(name) <= 34, name


def test_job_labels_are_valid_label_values_and_keep_distinct_runs_distinct():
    long_run = "scheduled__" + "2026-01-01T00:00:00.123456+00:00" * 3
    a = job_labels(pretrain_spec(labels={**OWNER, "run_id": long_run}))
    b = job_labels(pretrain_spec(labels={**OWNER, "run_id": long_run.replace("01T", "02T")}))
    for labels in (a, b, job_labels(pretrain_spec())):
        for key, value in labels.items():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)
    assert a["seekflow.io/run-id"] != b["seekflow.io/run-id"]
    plain = job_labels(pretrain_spec())
    assert plain["seekflow.io/dag-id"] == "seekflow_pipeline" and plain["seekflow.io/try-number"] == "1"
    assert plain["seekflow.io/run-id"].startswith("manual__2026-01-01T00_00_00")
    # An owner key cannot replace the labels the backend selects on; int and str try numbers name the same job.
    odd = job_labels(pretrain_spec(labels={**OWNER, "stage": "other", "job": "other"}))
    assert odd["seekflow.io/stage"] == "pretrain" and odd["seekflow.io/job"].startswith("sf-pretrain-")
    assert job_name(pretrain_spec(labels={**OWNER, "try_number": 1})) == job_name(pretrain_spec())


# -- secrets and literal values ---------------------------------------------------------------------------------------

def test_no_secret_value_appears_anywhere_in_the_manifests(monkeypatch):
    """The Secret's values reach the pods only through envFrom; render never reads the process environment."""
    template = list(yaml.safe_load_all((REPO / "k8s/platform/secrets.example.yaml").read_text()))
    [env_secret] = [d for d in template if d["metadata"]["name"] == "seekflow-env"]
    for key in env_secret["stringData"]:
        monkeypatch.setenv(key, FAKE_SECRET)   # as if the Airflow worker itself held the credentials
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{FAKE_SECRET}@mlflow:5000")
    for manifest in (render(pretrain_spec(), SETTINGS), render(curate_spec(), SETTINGS)):
        text = json.dumps(manifest) + yaml.safe_dump(manifest)
        assert FAKE_SECRET not in text
        assert "seekflow-env" in text                        # only the Secret's name
        assert "AWS_SECRET_ACCESS_KEY" not in text and "MLFLOW_TRACKING_URI" not in text
    placeholders = [v for v in env_secret["stringData"].values() if "CHANGE-ME" in v]
    assert placeholders and not any(p in json.dumps(render(pretrain_spec(), SETTINGS)) for p in placeholders)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD", "WANDB_API_KEY"])
def test_credentials_cannot_be_inlined_as_plain_env(name):
    with pytest.raises(ValueError, match="looks like a credential"):
        render(pretrain_spec(env={name: FAKE_SECRET}), SETTINGS)
    with pytest.raises(ValidationError, match="looks like a credential"):
        KubernetesSettings(extra_env={name: FAKE_SECRET})


@pytest.mark.parametrize("name", ["JOB_COMPLETION_INDEX", "SEEKFLOW_STAGE_CONFIG"])
def test_reserved_env_cannot_be_overridden(name):
    with pytest.raises(ValueError, match="reserved"):
        render(curate_spec(env={name: "3"}), SETTINGS)


def test_spec_env_wins_over_extra_env_and_dollar_signs_stay_literal():
    config = "note: costs $(HOME) and $$5 and $PATH\n"
    settings = KubernetesSettings(extra_env={"NCCL_DEBUG": "WARN", "FOO": "settings"})
    job = render(curate_spec(config_yaml=config, env={"FOO": "spec $(BAR)"}), settings)
    env = env_of(job)
    assert env["FOO"] == "spec $$(BAR)" and env["NCCL_DEBUG"] == "WARN"
    # What the container sees after Kubernetes' $(VAR) expansion is exactly the config the operator validated.
    container_env = {"HOME": "/root", "BAR": "x", "PATH": "/bin"}
    assert expand_k8s_vars(env["SEEKFLOW_STAGE_CONFIG"], container_env) == config
    assert expand_k8s_vars(env["FOO"], container_env) == "spec $(BAR)"
    names = [e["name"] for e in pod_of(job)["containers"][0]["env"]]
    assert len(names) == len(set(names))


def test_registry_stages_log_in_to_mlflow_as_the_promoter_and_the_others_as_the_jobs_user():
    secrets = {stage: pod_of(render(curate_spec(stage=stage, shards=1, sharded=False), SETTINGS))["containers"][0]
               ["envFrom"] for stage in ("curate", "evaluate", "register", "promote")}
    names = {stage: [ref["secretRef"]["name"] for ref in refs] for stage, refs in secrets.items()}
    assert names["curate"] == names["evaluate"] == ["seekflow-env", "seekflow-mlflow-jobs"]
    assert names["register"] == names["promote"] == ["seekflow-env", "seekflow-mlflow-promoter"]
    custom = KubernetesSettings(mlflow_secret=None, stage_mlflow_secrets={"promote": "prod-promoter"})
    assert pod_of(render(curate_spec(stage="promote", shards=1, sharded=False), custom))["containers"][0][
        "envFrom"] == [{"secretRef": {"name": "seekflow-env"}}, {"secretRef": {"name": "prod-promoter"}}]
    assert pod_of(render(curate_spec(), custom))["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "seekflow-env"}}]
    with pytest.raises(ValidationError, match="unknown stage kind 'promotion'"):
        KubernetesSettings(stage_mlflow_secrets={"promotion": "x"})


def test_pods_run_as_non_root_with_a_read_only_root_and_writable_scratch_home_and_tmp():
    for manifest in (render(pretrain_spec(), SETTINGS), render(curate_spec(), SETTINGS)):
        pod = pod_of(manifest)
        [container] = pod["containers"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                          "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "privileged": False, "readOnlyRootFilesystem": True}
        assert {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"} in container["volumeMounts"]
        env = env_of(manifest)
        assert (env["HOME"], env["TMPDIR"]) == ("/scratch/home", "/scratch")
        assert env["SEEKFLOW_SANDBOX_URL"] == "http://seekflow-sandbox:8080"
    pod = pod_of(render(curate_spec(), KubernetesSettings(scratch_mount="/tmp", sandbox_url=None, run_as_user=4242)))
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/tmp"]   # no second /tmp mount
    assert "SEEKFLOW_SANDBOX_URL" not in env_of({"kind": "Job", "spec": {"template": {"spec": pod}}})
    assert pod["securityContext"]["runAsUser"] == 4242
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        KubernetesSettings(run_as_user=0)
    with pytest.raises(ValidationError, match="not an http"):
        KubernetesSettings(sandbox_url="seekflow-sandbox:8080")


def test_spec_image_overrides_settings_image():
    pod = pod_of(render(curate_spec(image="registry.example/seekflow-train:dev"), SETTINGS))
    assert pod["containers"][0]["image"] == "registry.example/seekflow-train:dev"


def test_ttl_is_set_only_when_configured():
    assert "ttlSecondsAfterFinished" not in json.dumps(render(pretrain_spec(), SETTINGS))
    js = render(pretrain_spec(), KubernetesSettings(ttl_seconds_after_finished=3600))
    assert js["spec"]["ttlSecondsAfterFinished"] == 3600
    job = render(curate_spec(), KubernetesSettings(ttl_seconds_after_finished=60))
    assert job["spec"]["ttlSecondsAfterFinished"] == 60


# -- settings ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"gpus_per_node": -1}, "greater than or equal to 0"),
    ({"memory_request": "lots"}, "not a Kubernetes quantity"),
    ({"shm_size": "64 Gi"}, "not a Kubernetes quantity"),
    ({"memory_limit": "64Gi", "memory_request": "32Gi"}, "shm_size .* must be below memory_limit"),
    ({"memory_limit": "16Gi"}, "memory_limit .* is below memory_request"),
    ({"namespace": "Not_A_Namespace"}, "DNS-1123 label"),
    ({"env_secret": "bad/name"}, "DNS-1123 subdomain"),
    ({"on_finish_action": "archive"}, "'delete' or 'keep'"),
    ({"tolerations": [{"key": "a", "effects": "NoSchedule"}]}, "unknown keys"),
    ({"scratch_mount": "/dev/shm"}, "scratch_mount"),
    ({"max_restart": 3}, "Extra inputs are not permitted"),
])
def test_settings_reject_bad_values_naming_the_field(change, message):
    with pytest.raises(ValidationError, match=message):
        KubernetesSettings(**change)


def test_settings_defaults_and_loading(tmp_path):
    s = KubernetesSettings()
    assert (s.namespace, s.conn_id, s.service_account, s.gpus_per_node, s.max_restarts) == \
        ("seekflow", "kubernetes_default", "seekflow-job", 8, 3)
    assert (s.on_finish_action, s.pending_timeout_s, s.poll_interval_s, s.rendezvous_port) == ("delete", 900, 15, 29500)
    path = tmp_path / "k8s.yaml"
    path.write_text("namespace: ml\nmax_restarts: 5\n")
    assert KubernetesSettings.from_env({"SEEKFLOW_K8S_SETTINGS": str(path)}).max_restarts == 5
    assert KubernetesSettings.from_env({}) == KubernetesSettings()
    path.write_text("namespace: ml\nmax_restart: 5\n")
    with pytest.raises(ValidationError, match="max_restart"):
        KubernetesSettings.from_file(path)
