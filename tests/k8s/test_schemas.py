"""Every manifest seekflow renders or ships validates against real schemas, offline:
core kinds with kubernetes-validate (Kubernetes 1.33, strict), JobSets against the JobSet v0.12.0 CRD."""
from __future__ import annotations

import copy

import pytest
import yaml

from operators.backends.base import JobSpec
from operators.backends.k8s_render import render
from operators.backends.k8s_settings import KubernetesSettings
from tests.support.k8s import (KUBERNETES_VERSION, REPO, ManifestError, load_documents, validate_jobset,
                               validate_manifest)

K8S = REPO / "k8s"
PLATFORM = K8S / "platform"
OWNER = {"dag_id": "seekflow_pipeline", "task_id": "t", "run_id": "scheduled__2026-03-01T00:00:00+00:00",
         "try_number": "3"}
SETTINGS_VARIANTS = {
    "defaults": KubernetesSettings(),
    "everything": KubernetesSettings(
        image_pull_secrets=["regcred", "mirror"], node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        extra_env={"NCCL_DEBUG": "INFO"}, cpu_limit="64", scratch_storage_class="local-nvme",
        ttl_seconds_after_finished=86400, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                                        "effect": "NoSchedule"},
                                                       {"key": "dedicated", "operator": "Equal", "value": "training",
                                                        "effect": "NoExecute", "tolerationSeconds": 60}]),
    "cpu-cluster": KubernetesSettings(gpus_per_node=0, env_secret=None, memory_limit=None),
}
SPECS = {
    "pretrain-2x8": JobSpec(stage="pretrain", config_yaml="a: $(HOME)\n", launcher="torchrun", nodes=2,
                            procs_per_node=8, gpus_per_node=8, labels={**OWNER, "task_id": "pretrain"}),
    "pretrain-64-nodes": JobSpec(stage="long_context", config_yaml="a: 1\n", launcher="torchrun", nodes=64,
                                 labels=OWNER, env={"EXTRA": "1"}),
    "curate-16-shards": JobSpec(stage="curate", config_yaml="a: 1\n", shards=16, sharded=True, labels=OWNER),
    "register": JobSpec(stage="register", config_yaml="a: 1\n", labels=OWNER),
}


def yaml_files() -> list:
    return sorted(p for p in K8S.rglob("*.yaml"))


@pytest.mark.parametrize("settings", SETTINGS_VARIANTS, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rendered_manifests_validate(spec, settings):
    manifest = render(SPECS[spec], SETTINGS_VARIANTS[settings])
    against = validate_manifest(manifest)
    assert against in ("JobSet v0.12.0 CRD", KUBERNETES_VERSION)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_in_k8s_validates(path):
    docs = load_documents(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        if doc.get("kind") == "Kustomization":
            continue
        validate_manifest(doc)


def test_kustomization_lists_existing_valid_files_and_sets_the_namespace():
    kustomization = yaml.safe_load((PLATFORM / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "seekflow"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    kinds = set()
    for rel in listed:
        path = PLATFORM / rel
        assert path.is_file(), f"kustomization.yaml lists {rel}, which does not exist"
        for doc in load_documents(path):
            validate_manifest(doc)
            kinds.add(doc["kind"])
            # kustomize sets the namespace; a hard-coded other one would be a surprise.
            assert doc["metadata"].get("namespace") in (None, "seekflow"), (rel, doc["metadata"])
    assert {"Deployment", "StatefulSet", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
            "PersistentVolumeClaim", "Namespace", "NetworkPolicy"} <= kinds
    # Every platform YAML is either deployed or a template kept out on purpose.
    on_disk = {str(p.relative_to(PLATFORM)) for p in PLATFORM.rglob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - set(listed) == {"secrets.example.yaml"}
    # Overridable images are ones the manifests actually use.
    used = "\n".join((PLATFORM / rel).read_text() for rel in listed)
    for image in kustomization.get("images", []):
        assert f"image: {image['name']}:" in used


def platform_docs() -> list[dict]:
    kustomization = yaml.safe_load((PLATFORM / "kustomization.yaml").read_text())
    return [d for rel in kustomization["resources"] for d in load_documents(PLATFORM / rel)]


def test_backend_role_has_exactly_the_verbs_it_needs_in_the_namespace():
    docs = platform_docs()
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "seekflow-backend"]
    granted = {(g, r): sorted(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {   # test_security.py derives the same table from operators/backends/kubernetes.py
        ("jobset.x-k8s.io", "jobsets"): sorted(["create", "get", "list", "delete"]),
        ("batch", "jobs"): sorted(["create", "get", "list", "delete"]),
        ("", "pods"): ["list"],
        ("", "pods/log"): ["get"],
        ("", "events"): ["list"],
    }
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "seekflow-backend"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "seekflow-backend", "namespace": "seekflow"}]
    # Only the components that submit or poll jobs carry that ServiceAccount.
    with_backend_sa = {d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                       and d["spec"]["template"]["spec"].get("serviceAccountName") == "seekflow-backend"}
    assert with_backend_sa == {"airflow-scheduler", "airflow-triggerer"}


def test_platform_settings_configmap_is_valid_kubernetes_settings():
    [configmap] = [d for d in platform_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "seekflow-k8s"]
    settings = KubernetesSettings.model_validate(yaml.safe_load(configmap["data"]["kubernetes.yaml"]))
    assert settings.namespace == "seekflow" and settings.service_account == "seekflow-job"
    names = {d["metadata"]["name"] for d in platform_docs() if d["kind"] == "ServiceAccount"}
    assert settings.service_account in names
    secrets = {d["metadata"]["name"] for d in load_documents(PLATFORM / "secrets.example.yaml")}
    assert {settings.env_secret, settings.mlflow_secret, *settings.stage_mlflow_secrets.values()} <= secrets


def test_secret_templates_are_placeholders_in_string_data():
    for doc in load_documents(PLATFORM / "secrets.example.yaml"):
        assert doc["kind"] == "Secret" and "data" not in doc and doc["stringData"]
        assert any("CHANGE-ME" in v for v in doc["stringData"].values()), doc["metadata"]["name"]
    # No other file under k8s/ carries a Secret.
    for path in yaml_files():
        if path.name != "secrets.example.yaml":
            assert all(d.get("kind") != "Secret" for d in load_documents(path)), path


def test_referenced_secrets_and_configmaps_exist():
    docs = platform_docs()
    secrets = {d["metadata"]["name"]: d for d in load_documents(PLATFORM / "secrets.example.yaml")}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    text = yaml.safe_dump(docs)
    for ref in _refs(docs, "secretRef") + _refs(docs, "secretKeyRef"):
        assert ref["name"] in secrets, ref
        if "key" in ref:
            assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for ref in _refs(docs, "configMapRef"):
        assert ref["name"] in configmaps, ref
    for volume in _refs(docs, "secret"):
        if "secretName" in volume:
            for item in volume.get("items", []):
                assert item["key"] in secrets[volume["secretName"]]["stringData"], item
    assert "CHANGE-ME" not in text


def _refs(node, key: str) -> list[dict]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, dict):
                found.append(v)
            found += _refs(v, key)
    elif isinstance(node, list):
        for item in node:
            found += _refs(item, key)
    return found


def test_validators_catch_mistakes():
    """The checks are real: typical mistakes fail validation."""
    js = render(SPECS["pretrain-2x8"], KubernetesSettings())
    bad = copy.deepcopy(js)
    bad["spec"]["failurePolicy"]["maxRestart"] = 3          # misspelled: the API server would silently prune it
    with pytest.raises(ManifestError, match="maxRestart"):
        validate_jobset(bad)
    bad = copy.deepcopy(js)
    pod = bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["resources"]["limit"] = {"nvidia.com/gpu": 8}
    with pytest.raises(ManifestError, match="limit"):
        validate_jobset(bad)
    bad = copy.deepcopy(js)
    bad["metadata"]["name"] = "sf-" + "x" * 50
    with pytest.raises(ManifestError, match="DNS-1035"):
        validate_jobset(bad)
    job = render(SPECS["curate-16-shards"], KubernetesSettings())
    job["spec"]["completions"] = "sixteen"
    with pytest.raises(ManifestError, match="completions"):
        validate_manifest(job)
    job = render(SPECS["curate-16-shards"], KubernetesSettings())
    job["metadata"]["labels"]["seekflow.io/run-id"] = "manual__2026-01-01T00:00:00+00:00"
    with pytest.raises(ManifestError, match="bad label value"):
        validate_manifest(job)
