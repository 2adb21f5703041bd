"""What the Kubernetes backend submits: a JobSet for torchrun stages, an Indexed Job for CPU data shards.

Pure functions of (JobSpec, KubernetesSettings) -> plain dicts, so the manifests are deterministic, readable in
`k8s/jobs/`, and validated against the real schemas in tests (`tests/k8s/`).

- `job_name(spec)`: `sf-<stage>-<hash10>`, the hash over the stage and the spec's labels (dag, task, run, try). A task
  restarted mid-wait computes the same name and reattaches; a second submission of the same try gets a 409.
- `job_labels(spec)`: valid label values identifying dag/task/run/try, for selectors (reattach across tries).
- `render(spec, settings)`: the manifest. Every pod meets the Pod Security Standard `restricted` (`pod_security`) and
  gets its credentials only by Secret name (`env_secrets`: S3, then the stage's MLflow login).

Multi-node torchrun uses static rendezvous, the form JobSet documents for PyTorch: node rank = the pod's completion
index, master = the leader pod (index 0), reachable before it is Ready at its stable DNS name
`<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>` (JobSet CRD, `network.enableDNSHostnames`). So global
rank 0, the rank that talks to MLflow and prints the stage result, always runs in the leader pod.
"""
from __future__ import annotations

import hashlib
import json
import re

from operators.backends.base import JobSpec
from operators.backends.k8s_settings import KubernetesSettings, check_plain_env

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "node"                    # the one replicatedJob of a training JobSet
CONTAINER = "train"                        # the one container of every job pod
CONFIG_ENV = "SEEKFLOW_STAGE_CONFIG"       # the validated stage config YAML, read by `--config env:...`
SHARDS_ENV = "SEEKFLOW_NUM_SHARDS"         # an Indexed Job's shard count (the index is JOB_COMPLETION_INDEX)
SANDBOX_URL_ENV = "SEEKFLOW_SANDBOX_URL"   # where evaluate/RL send model-written programs (training.verify)

LABEL_PREFIX = "seekflow.io/"
PART_OF_LABEL = "app.kubernetes.io/part-of"
STAGE_LABEL = LABEL_PREFIX + "stage"
JOB_LABEL = LABEL_PREFIX + "job"           # = job_name(spec); on the job and on every pod it creates
TRY_LABEL = LABEL_PREFIX + "try-number"    # drop it from a selector to find the job of any try of a task

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HASH_LEN = 10
_STAGE_SLUG_MAX = 20                       # keeps generated pod names far below 63 characters (see _check_name_room)


# -- names and labels ----------------------------------------------------------------------------------------------

def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:_HASH_LEN]


def _slug(text: str, limit: int) -> str:
    """Lower-case DNS-1123 label characters only (underscores become dashes)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "job"


def job_name(spec: JobSpec) -> str:
    """`sf-<stage>-<hash10>`: deterministic, a DNS-1035 label, short enough for JobSet's generated pod names."""
    identity = {"stage": spec.stage, "labels": {k: str(v) for k, v in spec.labels.items()}}   # try 1 == "1"
    if not spec.labels:   # no owner: fall back on the config so different ad-hoc jobs do not collide
        identity["config"] = spec.config_yaml
    return f"sf-{_slug(spec.stage, _STAGE_SLUG_MAX)}-{_digest(identity)}"


def _label_value(raw: str) -> str:
    """`raw` if it is a valid label value; else its valid characters (truncated) plus a hash of `raw`, so distinct
    run ids (`manual__2026-01-01T00:00:00+00:00`) stay distinct."""
    if len(raw) <= 63 and _LABEL_VALUE.match(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)[: 63 - _HASH_LEN - 1]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    suffix = hashlib.sha256(raw.encode()).hexdigest()[:_HASH_LEN]
    return f"{cleaned}-{suffix}" if cleaned else suffix


def _label_key(key: str) -> str:
    return LABEL_PREFIX + _slug(key, 63)   # dag_id -> seekflow.io/dag-id


def job_labels(spec: JobSpec) -> dict[str, str]:
    """Labels of the job and its pods: `app.kubernetes.io/part-of`, `seekflow.io/stage`, `seekflow.io/job`, and one
    `seekflow.io/<key>` per JobSpec label (dag_id -> dag-id, task_id, run_id, try_number), values made valid."""
    labels = {PART_OF_LABEL: "seekflow", STAGE_LABEL: _label_value(spec.stage), JOB_LABEL: job_name(spec)}
    for key, value in sorted(spec.labels.items()):
        labels.setdefault(_label_key(key), _label_value(str(value)))   # an owner key never replaces the above
    return labels


def _annotations(spec: JobSpec) -> dict[str, str]:
    """The exact, unsanitized owner values (labels may be hashed), for people and for reattach checks."""
    return {_label_key(key): str(value) for key, value in sorted(spec.labels.items())}


def _leader_host(name: str) -> str:
    """Stable DNS name of the leader pod (replicated job 0, completion index 0) of JobSet `name`."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}"


# -- pod pieces ----------------------------------------------------------------------------------------------------

def _literal(value: str) -> str:
    """Kubernetes expands `$(VAR)` in env values and args; `$$` is its escape for a literal `$`."""
    return value.replace("$", "$$")


def _env(spec: JobSpec, settings: KubernetesSettings, extra: dict[str, str]) -> list[dict]:
    check_plain_env(spec.env, f"{spec.stage}: JobSpec.env")
    env = {CONFIG_ENV: spec.config_yaml, **extra,
           "PYTHONUNBUFFERED": "1",                  # log lines reach `kubectl logs` as they happen
           "TMPDIR": settings.scratch_mount,         # temporary files on scratch, not the container's root fs
           "HOME": f"{settings.scratch_mount.rstrip('/')}/home",   # caches (triton, HF) too: the root fs is read-only
           **({SANDBOX_URL_ENV: settings.sandbox_url} if settings.sandbox_url else {}),
           **dict(sorted(settings.extra_env.items())),
           **dict(sorted(spec.env.items()))}         # the spec wins over cluster-wide defaults
    return [{"name": k, "value": _literal(v)} for k, v in env.items()]


def _volumes(settings: KubernetesSettings, shm: bool) -> tuple[list[dict], list[dict]]:
    if settings.scratch_storage_class:
        claim = {"accessModes": ["ReadWriteOnce"], "storageClassName": settings.scratch_storage_class,
                 "resources": {"requests": {"storage": settings.scratch_size}}}
        scratch = {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
    else:
        scratch = {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}}
    volumes, mounts = [scratch], [{"name": "scratch", "mountPath": settings.scratch_mount}]
    if settings.scratch_mount.rstrip("/") != "/tmp":   # /tmp for tools that ignore $TMPDIR (read-only root fs)
        mounts.append({"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"})
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _resources(cpu: str, memory: str, memory_limit: str | None, cpu_limit: str | None = None,
               gpus: int = 0, gpu_resource: str = "") -> dict:
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {}
    if cpu_limit:
        limits["cpu"] = cpu_limit
    if memory_limit:
        limits["memory"] = memory_limit
    if gpus:   # extended resources: request must equal limit
        requests[gpu_resource] = limits[gpu_resource] = str(gpus)
    return {"requests": requests, **({"limits": limits} if limits else {})}


def env_secrets(stage: str, settings: KubernetesSettings) -> list[str]:
    """The Secrets a job of stage kind `stage` gets (envFrom, in order): S3 and endpoints, then its MLflow login."""
    mlflow = settings.stage_mlflow_secrets.get(stage, settings.mlflow_secret)
    return [name for name in (settings.env_secret, mlflow) if name]


def pod_security(settings: KubernetesSettings) -> tuple[dict, dict]:
    """(pod, container) securityContext meeting the Pod Security Standard `restricted` (k8s/platform/namespace.yaml).
    GPUs come from the device plugin, /dev/shm is an emptyDir: nothing here needs privilege or a capability."""
    uid = settings.run_as_user
    pod = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,   # fsGroup: scratch writable
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
                 "readOnlyRootFilesystem": settings.read_only_root_filesystem}
    return pod, container


def _pod_spec(spec: JobSpec, settings: KubernetesSettings, *, command: list[str], env_extra: dict[str, str],
              resources: dict, gpu: bool, node_selector: dict[str, str], ports: list[dict] | None = None) -> dict:
    volumes, mounts = _volumes(settings, shm=gpu or spec.launcher == "torchrun")
    secrets = env_secrets(spec.stage, settings)
    pod_context, container_context = pod_security(settings)
    container = {
        "name": CONTAINER,
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": _env(spec, settings, env_extra),
        **({"envFrom": [{"secretRef": {"name": name}} for name in secrets]} if secrets else {}),
        "resources": resources,
        "volumeMounts": mounts,
        **({"ports": ports} if ports else {}),
        "securityContext": container_context,
    }
    pod = {
        "restartPolicy": "Never",   # a failed process fails its pod: the Job/JobSet decides what to restart
        "serviceAccountName": settings.service_account,
        "automountServiceAccountToken": False,   # jobs never call the Kubernetes API
        "enableServiceLinks": False,   # a Service named `mlflow` would inject MLFLOW_PORT=tcp://..., which mlflow reads
        "securityContext": pod_context,
        "containers": [container],
        "volumes": volumes,
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if gpu and settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return pod


def _metadata(spec: JobSpec, settings: KubernetesSettings) -> dict:
    return {"name": job_name(spec), "namespace": settings.namespace, "labels": job_labels(spec),
            "annotations": _annotations(spec)}


# -- the two manifests ---------------------------------------------------------------------------------------------

def _torchrun_command(spec: JobSpec, name: str, nproc: int, port: int) -> list[str]:
    return ["torchrun", f"--nnodes={spec.nodes}", f"--nproc-per-node={nproc}",
            "--node-rank=$(JOB_COMPLETION_INDEX)",   # expanded by Kubernetes from the Indexed Job's env
            "--rdzv-backend=static", f"--master-addr={_leader_host(name)}", f"--master-port={port}",
            "--max-restarts=0",   # no in-pod restarts: a failure fails the pod and JobSet restarts the whole set
            *(_literal(a) for a in spec.training_args(f"env:{CONFIG_ENV}"))]


def _gpus_and_procs(spec: JobSpec, settings: KubernetesSettings) -> tuple[int, int]:
    gpus = spec.gpus_per_node if spec.gpus_per_node > 0 else settings.gpus_per_node
    nproc = spec.procs_per_node if spec.procs_per_node > 1 else max(gpus, 1)
    if gpus and nproc > gpus:
        raise ValueError(f"{spec.stage}: {nproc} processes per node but only {gpus} GPUs per node")
    return gpus, nproc


def _check_name_room(name: str, nodes: int) -> None:
    """JobSet's webhook rejects a JobSet whose longest pod name (`<name>-node-0-<N-1>-xxxxx`) exceeds 63 chars."""
    longest = f"{name}-{REPLICATED_JOB}-0-{nodes - 1}-abcde"
    if len(longest) > 63:
        raise ValueError(f"JobSet {name}: generated pod names would exceed 63 characters ({longest})")


def _jobset(spec: JobSpec, settings: KubernetesSettings) -> dict:
    if spec.shards != 1:
        raise ValueError(f"{spec.stage}: a torchrun stage runs on nodes, not shards (got shards={spec.shards})")
    name = job_name(spec)
    _check_name_room(name, spec.nodes)
    gpus, nproc = _gpus_and_procs(spec, settings)
    labels = job_labels(spec)
    port = settings.rendezvous_port
    pod = _pod_spec(
        spec, settings, command=_torchrun_command(spec, name, nproc, port), env_extra={},
        resources=_resources(settings.cpu_request, settings.memory_request, settings.memory_limit,
                             settings.cpu_limit, gpus, settings.gpu_resource),
        gpu=gpus > 0, node_selector=settings.node_selector,
        ports=[{"name": "rendezvous", "containerPort": port}])
    job = {
        "parallelism": spec.nodes, "completions": spec.nodes,   # one pod per node, all running at once
        "completionMode": "Indexed",                            # JOB_COMPLETION_INDEX = node rank
        "backoffLimit": 0,                                      # any pod failure fails the Job -> JobSet restart
        **({"ttlSecondsAfterFinished": settings.ttl_seconds_after_finished}
           if settings.ttl_seconds_after_finished is not None else {}),
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
    }
    jobset_spec = {
        # Headless Service `<name>` + pod hostnames; DNS records published before pods are Ready (rendezvous).
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": name},
        "coordinator": {"replicatedJob": REPLICATED_JOB, "jobIndex": 0, "podIndex": 0},
        "failurePolicy": {"maxRestarts": settings.max_restarts},
        "successPolicy": {"operator": "All"},
        "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                            "template": {"metadata": {"labels": dict(labels)}, "spec": job}}],
    }
    if settings.ttl_seconds_after_finished is not None:
        jobset_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": _metadata(spec, settings), "spec": jobset_spec}


def _indexed_job(spec: JobSpec, settings: KubernetesSettings) -> dict:
    if spec.nodes != 1:
        raise ValueError(f"{spec.stage}: a python stage scales with shards, not nodes (got nodes={spec.nodes})")
    if spec.shards < 1:
        raise ValueError(f"{spec.stage}: shards must be >= 1 (got {spec.shards})")
    if spec.shards > 1 and not spec.sharded:
        raise ValueError(f"{spec.stage}: {spec.shards} shards, but the spec is not a shard phase (sharded=False)")
    pod = _pod_spec(
        spec, settings, command=["python", *(_literal(a) for a in spec.training_args(f"env:{CONFIG_ENV}"))],
        env_extra={SHARDS_ENV: str(spec.shards)} if spec.sharded else {},
        resources=_resources(settings.shard_cpu_request, settings.shard_memory_request, settings.shard_memory_limit),
        gpu=False, node_selector=settings.shard_node_selector)
    job = {
        "completionMode": "Indexed",   # each pod gets JOB_COMPLETION_INDEX = its shard
        "completions": spec.shards, "parallelism": spec.shards,
        "backoffLimit": settings.shard_backoff_limit,
        **({"ttlSecondsAfterFinished": settings.ttl_seconds_after_finished}
           if settings.ttl_seconds_after_finished is not None else {}),
        "template": {"metadata": {"labels": job_labels(spec)}, "spec": pod},
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec, settings), "spec": job}


def render(spec: JobSpec, settings: KubernetesSettings) -> dict:
    """The manifest for `spec`: a JobSet (`torchrun`) or an Indexed batch/v1 Job (`python`)."""
    if spec.nodes < 1:
        raise ValueError(f"{spec.stage}: nodes must be >= 1 (got {spec.nodes})")
    if spec.launcher == "torchrun":
        return _jobset(spec, settings)
    if spec.launcher == "python":
        return _indexed_job(spec, settings)
    raise ValueError(f"{spec.stage}: unknown launcher {spec.launcher!r}")
