"""Where and how the Kubernetes backend runs jobs: one validated settings model.

The Airflow side reads it once (`KubernetesSettings.from_env()`: the YAML file named by `$SEEKFLOW_K8S_SETTINGS`, which
the platform mounts from the `seekflow-k8s` ConfigMap) and hands it to `k8s_render.render`. Secrets never live here:
`env_secret` (S3) and `mlflow_secret` / `stage_mlflow_secrets` (the MLflow login) name Secrets whose keys become the
job's environment, so no credential is ever written into a manifest.
"""
from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SETTINGS_ENV = "SEEKFLOW_K8S_SETTINGS"   # path of a YAML file with KubernetesSettings fields

# Reserved environment variables: Kubernetes sets JOB_COMPLETION_INDEX (the shard / node rank); render sets the rest.
RESERVED_ENV = frozenset({"JOB_COMPLETION_INDEX", "SEEKFLOW_STAGE_CONFIG", "SEEKFLOW_NUM_SHARDS"})
# Names that look like credentials must come from the Secret (`env_secret`), never from plain env values.
_SECRET_LIKE = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A non-negative Kubernetes quantity without exponents: "500m", "8", "64Gi", "1.5T".
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity as a number (cores or bytes); ValueError if it is not one."""
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. '500m', '8', '64Gi')")
    return Decimal(match.group(1)) * _SUFFIX[match.group(3) or ""]


def check_plain_env(env: dict[str, str], where: str) -> None:
    """Plain (inlined) environment variables: valid names, not reserved, not credentials."""
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"{where}: {name!r} is not a valid environment variable name")
        if name in RESERVED_ENV:
            raise ValueError(f"{where}: {name} is reserved (set by Kubernetes or by the renderer)")
        if _SECRET_LIKE.search(name):
            raise ValueError(f"{where}: {name} looks like a credential; put it in the Secret named by env_secret "
                             "instead of inlining it in the manifest")


class KubernetesSettings(BaseModel):
    """How seekflow's jobs run on a Kubernetes cluster (JobSet for torchrun stages, Indexed Job for CPU shards)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- where ------------------------------------------------------------------------------------------------------
    namespace: str = Field("seekflow", description="Namespace the jobs run in (the platform's namespace).")
    conn_id: str = Field("kubernetes_default", description="Airflow connection of the cncf-kubernetes provider "
                         "(in cluster: extra {\"in_cluster\": true}).")
    service_account: str = Field("seekflow-job", description="ServiceAccount of the job pods; they need no API access.")

    # -- what -------------------------------------------------------------------------------------------------------
    image: str = Field("ghcr.io/seekflow/seekflow-train:0.1.0",
                       description="Training image (seekflow[train] installed); JobSpec.image overrides it.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Container imagePullPolicy.")
    image_pull_secrets: list[str] = Field(default_factory=list,
                                          description="Names of docker-registry Secrets for a private registry.")
    env_secret: str | None = Field(
        "seekflow-env", description="Secret whose keys become environment variables of every job container "
        "(envFrom): MLFLOW_TRACKING_URI, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3. "
        "Only its name appears in manifests.")
    extra_env: dict[str, str] = Field(default_factory=dict,
                                      description="Non-secret environment variables for every job (e.g. NCCL_DEBUG).")
    # MLflow users (basic-auth): the registry writes (register, promote) run as a user of their own, because MLflow
    # lets whoever may create a version of a registered model (EDIT) also move its aliases (k8s/platform/mlflow.yaml).
    mlflow_secret: str | None = Field(
        "seekflow-mlflow-jobs", description="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD of the jobs' MLflow user "
        "(envFrom, after env_secret), for every stage not in stage_mlflow_secrets; None: no MLflow login.")
    stage_mlflow_secrets: dict[str, str] = Field(
        default_factory=lambda: {"register": "seekflow-mlflow-promoter", "promote": "seekflow-mlflow-promoter"},
        description="Stage kind -> Secret replacing mlflow_secret for that stage's jobs (the promoter's login).")
    sandbox_url: str | None = Field(
        "http://seekflow-sandbox:8080", description="The sandbox service (k8s/platform/sandbox.yaml) that evaluate "
        "and RL jobs send model-written programs to, as $SEEKFLOW_SANDBOX_URL; None: not set.")

    # -- pod security (every job pod meets the Pod Security Standard `restricted`) -----------------------------------
    run_as_user: int = Field(1000, ge=1, description="UID (and GID, fsGroup) of job pods: the training image's USER. "
                             "Never 0: pods run with runAsNonRoot.")
    read_only_root_filesystem: bool = Field(
        True, description="Read-only root filesystem for job containers; $HOME, $TMPDIR and /tmp are on scratch.")

    # -- GPU training pods (JobSet) ---------------------------------------------------------------------------------
    gpus_per_node: int = Field(8, ge=0, description="GPUs per training pod (one pod per node) when the JobSpec does "
                               "not say; 0 runs torchrun stages on CPU.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name the GPU device plugin exposes.")
    cpu_request: str = Field("16", description="CPU request of a training pod.")
    cpu_limit: str | None = Field(None, description="CPU limit of a training pod (none: no CFS throttling).")
    memory_request: str = Field("128Gi", description="Memory request of a training pod.")
    memory_limit: str | None = Field("512Gi", description="Memory limit of a training pod; /dev/shm counts toward it.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of training pods, e.g. "
                                          "{\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}.")
    tolerations: list[dict] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations of GPU pods (default: the GPU operator's nvidia.com/gpu NoSchedule taint).")
    shm_size: str = Field("64Gi", description="Size of /dev/shm (a memory-medium emptyDir); NCCL and data loader "
                          "workers need far more than the container default of 64Mi.")
    rendezvous_port: int = Field(29500, ge=1024, le=65535, description="torchrun's master port on the leader pod.")
    max_restarts: int = Field(3, ge=0, description="JobSet failurePolicy.maxRestarts: a failed pod restarts the whole "
                              "set, and training resumes from its last checkpoint.")

    # -- CPU shard pods (Indexed Job) -------------------------------------------------------------------------------
    shard_cpu_request: str = Field("4", description="CPU request of one data shard pod.")
    shard_memory_request: str = Field("16Gi", description="Memory request of one data shard pod.")
    shard_memory_limit: str | None = Field("32Gi", description="Memory limit of one data shard pod.")
    shard_node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of data shard pods.")
    shard_backoff_limit: int = Field(2, ge=0, description="Pod failures an Indexed Job tolerates (shards are "
                                     "idempotent, a retried shard redoes its part).")

    # -- scratch ----------------------------------------------------------------------------------------------------
    scratch_size: str = Field("200Gi", description="Local scratch space per pod (also $TMPDIR).")
    scratch_mount: str = Field("/scratch", description="Where the scratch volume is mounted.")
    scratch_storage_class: str | None = Field(
        None, description="If set, scratch is a generic ephemeral volume of this StorageClass (e.g. local NVMe); "
        "otherwise an emptyDir on the node's disk.")

    # -- lifecycle (read by the backend) ----------------------------------------------------------------------------
    on_finish_action: Literal["delete", "keep"] = Field(
        "delete", description="After success or failure (logs collected first): delete the job or keep it.")
    pending_timeout_s: float = Field(900, gt=0, description="Fail the task if a pod stays Pending (unschedulable, "
                                     "image pull failure) this long; the pod's events go to the task log.")
    poll_interval_s: float = Field(15, gt=0, description="Seconds between status polls of the deferred trigger.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Let Kubernetes garbage-collect finished jobs after this many seconds (a safety net "
        "for on_finish_action=keep).")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a valid namespace name (DNS-1123 label)")
        return v

    @field_validator("service_account", "env_secret", "mlflow_secret", "scratch_storage_class")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_SUBDOMAIN.match(v):
            raise ValueError(f"{v!r} is not a valid Kubernetes object name (DNS-1123 subdomain)")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            cls._object_name(name)
        return v

    @field_validator("stage_mlflow_secrets")
    @classmethod
    def _stage_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        # Keys are stage kinds, as JobSpec.stage is; training.config is pure Python (no torch).
        from training.config.pipeline import STAGES

        for stage, secret in v.items():
            if stage not in STAGES:
                raise ValueError(f"stage_mlflow_secrets: unknown stage kind {stage!r}; choose from {', '.join(STAGES)}")
            cls._object_name(secret)
        return v

    @field_validator("sandbox_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size", "scratch_size",
                     "shard_cpu_request", "shard_memory_request", "shard_memory_limit")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None:
            parse_quantity(v)
        return v

    @field_validator("scratch_mount")
    @classmethod
    def _mount(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") in ("", "/dev", "/dev/shm", "/proc", "/sys"):
            raise ValueError(f"{v!r}: scratch_mount must be an absolute path outside /, /dev, /proc and /sys")
        return v

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, v: dict[str, str]) -> dict[str, str]:
        check_plain_env(v, "extra_env")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict]) -> list[dict]:
        for t in v:
            unknown = set(t) - _TOLERATION_KEYS
            if unknown:
                raise ValueError(f"toleration {t}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOLERATION_KEYS)}")
        return v

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> KubernetesSettings:
        pairs = [("cpu_request", "cpu_limit"), ("memory_request", "memory_limit"),
                 ("shard_memory_request", "shard_memory_limit")]
        for req, lim in pairs:
            limit = getattr(self, lim)
            if limit is not None and parse_quantity(limit) < parse_quantity(getattr(self, req)):
                raise ValueError(f"{lim} ({limit}) is below {req} ({getattr(self, req)})")
        # A memory-medium emptyDir is charged to the pod's memory: a /dev/shm as large as the limit would OOM-kill it.
        if self.memory_limit is not None and parse_quantity(self.shm_size) >= parse_quantity(self.memory_limit):
            raise ValueError(f"shm_size ({self.shm_size}) must be below memory_limit ({self.memory_limit}): "
                             "/dev/shm is memory and counts toward the limit")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> KubernetesSettings:
        """Settings from a YAML mapping of field values (unknown keys are errors)."""
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of KubernetesSettings fields")
        return cls.model_validate(doc)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KubernetesSettings:
        """Settings from the file named by $SEEKFLOW_K8S_SETTINGS, or the defaults when it is unset."""
        path = (os.environ if environ is None else environ).get(SETTINGS_ENV)
        return cls.from_file(path) if path else cls()
