"""Least privilege on the cluster, checked on every manifest in k8s/ and every job the backend renders for every
stage: the Pod Security Standard `restricted` (plus a read-only root filesystem), a NetworkPolicy for every pod, a
Role with exactly the verbs operators/backends/kubernetes.py calls, Pod Security labels on the namespace, a sandbox
pod holding nothing and reaching nothing, SeaweedFS reachable only through its S3 gateway, and each Secret only
where it is needed."""
from __future__ import annotations

import ast
import configparser
import json
import re
from pathlib import Path

import pytest
import yaml

from operators.backends import kubernetes as backend_module
from operators.backends.base import JobSpec
from operators.backends.k8s_render import JOB_LABEL, render
from operators.backends.k8s_settings import KubernetesSettings
from tests.support.k8s import REPO, load_documents
from training.config.pipeline import STAGES

K8S = REPO / "k8s"
PLATFORM = K8S / "platform"
APP = "app.kubernetes.io/name"
SANDBOX = "seekflow-sandbox"
# Pod Security Standards, restricted profile (Kubernetes 1.33): the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}
OWNER = {"dag_id": "seekflow_pipeline", "task_id": "t", "run_id": "manual__2026-01-01T00:00:00+00:00",
         "try_number": "1"}


def platform_docs() -> list[dict]:
    kustomization = yaml.safe_load((PLATFORM / "kustomization.yaml").read_text())
    return [d for rel in kustomization["resources"] for d in load_documents(PLATFORM / rel)]


def platform_settings() -> KubernetesSettings:
    [configmap] = load_documents(PLATFORM / "settings.yaml")
    return KubernetesSettings.model_validate(yaml.safe_load(configmap["data"]["kubernetes.yaml"]))


def stage_specs() -> dict[str, JobSpec]:
    """One JobSpec per way each registered stage kind runs: its launcher, and its shard phase when it has one."""
    specs = {}
    for kind, cls in STAGES.items():
        declared = cls.stage_spec
        specs[kind] = JobSpec(stage=kind, config_yaml="a: 1\n", launcher=declared.launcher,
                              gpus_per_node=declared.gpus_per_node, labels={**OWNER, "task_id": kind})
        if declared.shardable:
            specs[f"{kind}_shards"] = JobSpec(stage=kind, config_yaml="a: 1\n", shards=4, sharded=True,
                                              labels={**OWNER, "task_id": f"{kind}_shards"})
    return specs


def pod_templates(doc: dict) -> list[tuple[str, dict, dict]]:
    """(name, labels, pod spec) of each pod a workload manifest creates."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        template = doc["spec"]["template"]
        return [(name, template["metadata"].get("labels", {}), template["spec"])]
    if kind == "JobSet":
        return [(f"{name}/{r['name']}", r["template"]["spec"]["template"]["metadata"]["labels"],
                 r["template"]["spec"]["template"]["spec"]) for r in doc["spec"]["replicatedJobs"]]
    return []


def manifest_pods() -> dict[str, tuple[dict, dict]]:
    pods = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_documents(path):
            for name, labels, spec in pod_templates(doc):
                pods[f"{path.relative_to(K8S)}:{name}"] = (labels, spec)
    return pods


def rendered_pods() -> dict[str, tuple[dict, dict]]:
    pods = {}
    for settings_name, settings in (("platform", platform_settings()), ("defaults", KubernetesSettings())):
        for spec_name, spec in stage_specs().items():
            for name, labels, pod in pod_templates(render(spec, settings)):
                pods[f"{settings_name}:{spec_name}:{name}"] = (labels, pod)
    return pods


ALL_PODS = {**manifest_pods(), **rendered_pods()}


def test_every_stage_and_every_platform_component_is_checked():
    names = " ".join(ALL_PODS)
    assert all(f":{kind}:" in names for kind in STAGES)
    for component in ("airflow-api-server", "airflow-scheduler", "airflow-triggerer", "airflow-dag-processor",
                      "airflow-postgres", "mlflow", "seaweedfs", SANDBOX):
        assert f":{component}" in names, component
    assert "jobs/pretrain-jobset.yaml" in names and "jobs/curate-indexed-job.yaml" in names


# -- Pod Security Standard `restricted` -----------------------------------------------------------------------------

def restricted_violations(pod: dict) -> list[str]:
    """What keeps `pod` from the `restricted` profile (and from a read-only root filesystem, a house rule)."""
    problems = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    problems += [f"volume {v['name']}: type {t}" for v in pod.get("volumes", [])
                 for t in set(v) - {"name"} if t not in RESTRICTED_VOLUMES]
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("sysctls"):
        problems.append("sysctls")
    containers = pod.get("initContainers", []) + pod["containers"] + pod.get("ephemeralContainers", [])
    for c in containers:
        sc, who = c.get("securityContext", {}), f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{who}: privileged")
        if any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{who}: hostPort")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{who}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{who}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{who}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{who}: runAsNonRoot is not set")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{who}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{who}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{who}: procMount")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{who}: root filesystem is writable")
    return problems


@pytest.mark.parametrize("name", ALL_PODS)
def test_pod_meets_the_restricted_pod_security_standard(name):
    assert restricted_violations(ALL_PODS[name][1]) == []


def test_the_restricted_check_catches_what_it_should():
    pod = {"hostIPC": True, "volumes": [{"name": "dev", "hostPath": {"path": "/dev"}}],
           "containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}]}
    found = " ".join(restricted_violations(pod))
    for expected in ("hostIPC", "hostPath", "allowPrivilegeEscalation", "drop ALL", "IPC_LOCK", "runAsNonRoot",
                     "seccompProfile", "writable"):
        assert expected in found


def test_namespace_enforces_pod_security_restricted():
    [namespace] = load_documents(PLATFORM / "namespace.yaml")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert re.fullmatch(r"v1\.\d+|latest", labels["pod-security.kubernetes.io/enforce-version"])


@pytest.mark.parametrize("dockerfile", sorted((K8S / "images").glob("Dockerfile.*")), ids=lambda p: p.name)
def test_every_image_ends_as_a_numeric_non_root_user(dockerfile):
    users = re.findall(r"^USER\s+(\S+)\s*$", dockerfile.read_text(), flags=re.MULTILINE)
    assert users and users[-1].isdigit() and int(users[-1]) > 0, users


# -- NetworkPolicies ------------------------------------------------------------------------------------------------

def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value, values = e["key"] in labels, labels.get(e["key"]), e.get("values", [])
        ok = {"In": present and value in values, "NotIn": not present or value not in values,
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


POLICIES = [d for d in platform_docs() if d["kind"] == "NetworkPolicy"]
PLATFORM_PODS = {labels[APP]: (labels, spec) for d in platform_docs() for _, labels, spec in pod_templates(d)}
JOB_POD_LABELS = next(labels for name, (labels, _) in ALL_PODS.items() if name.startswith("platform:"))


def specific_policies(labels: dict) -> list[dict]:
    return [p for p in POLICIES if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)]


def peers(rule: dict, direction: str) -> list[dict]:
    return rule.get("from" if direction == "ingress" else "to", [])


def test_default_deny_isolates_every_pod_both_ways():
    [deny] = [p for p in POLICIES if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


@pytest.mark.parametrize("name", ALL_PODS)
def test_every_pod_has_a_network_policy_of_its_own(name):
    labels = ALL_PODS[name][0]
    policies = specific_policies(labels)
    assert policies, f"{name}: only default-deny selects it"
    assert {"Ingress", "Egress"} <= {t for p in policies for t in p["spec"]["policyTypes"]}
    key = APP if APP in labels else JOB_LABEL   # the platform's app label, or the label every rendered job pod has
    named = {k for p in policies for k in p["spec"]["podSelector"].get("matchLabels", {})}
    named |= {e["key"] for p in policies for e in p["spec"]["podSelector"].get("matchExpressions", [])}
    assert key in named, f"{name}: no policy selects it by {key}"


def test_every_selector_in_a_policy_names_pods_that_exist():
    known = [labels for labels, _ in PLATFORM_PODS.values()] + [JOB_POD_LABELS]
    for policy in POLICIES:
        selectors = [policy["spec"]["podSelector"]] + [
            peer["podSelector"] for direction in ("ingress", "egress") for rule in policy["spec"].get(direction, [])
            for peer in peers(rule, direction) if "podSelector" in peer and "namespaceSelector" not in peer]
        for selector in selectors:
            if selector:
                assert any(selects(selector, labels) for labels in known), (policy["metadata"]["name"], selector)


def reachable(source: dict, target: dict, port: int) -> bool:
    """Whether `source` may open a TCP connection to `target` on `port` under the policies (both ends must allow)."""
    def allowed(own: dict, other: dict, direction: str) -> bool:
        policies = [p for p in POLICIES if selects(p["spec"]["podSelector"], own)]
        if not any(direction.capitalize() in p["spec"]["policyTypes"] for p in policies):
            return True
        return any((not rule.get("ports") or any(r.get("port") == port for r in rule["ports"]))
                   and (not peers(rule, direction) or any("podSelector" in peer and "namespaceSelector" not in peer
                                                          and selects(peer["podSelector"], other)
                                                          for peer in peers(rule, direction)))
                   for p in policies for rule in p["spec"].get(direction, []))
    return allowed(source, target, "egress") and allowed(target, source, "ingress")


def test_the_connections_the_platform_makes_are_allowed_and_nothing_else():
    pods = {name: labels for name, (labels, _) in PLATFORM_PODS.items()} | {"job": JOB_POD_LABELS}
    # Every port something here listens on, plus torchrun's and one of NCCL's ephemeral ports.
    ports = {53, 5000, 5432, 8080, 8333, 8793, 8794, 8888, 9333, 18888, 19333, 29500, 40123}
    needed = {("job", "mlflow", 5000), ("job", "seaweedfs", 8333), ("job", SANDBOX, 8080),
              ("mlflow", "seaweedfs", 8333), ("airflow-scheduler", "airflow-api-server", 8080),
              ("airflow-api-server", "airflow-scheduler", 8793), ("airflow-api-server", "airflow-triggerer", 8794)}
    needed |= {(a, "airflow-postgres", 5432) for a in pods if a.startswith("airflow-") and a != "airflow-postgres"}
    needed |= {(same, same, port) for same in ("job", "seaweedfs") for port in ports}   # rendezvous/NCCL; in-pod
    allowed = {(a, b, port) for a in pods for b in pods for port in ports if reachable(pods[a], pods[b], port)}
    assert allowed == needed, f"missing: {needed - allowed}; extra: {allowed - needed}"


def test_only_the_components_that_call_the_kubernetes_api_may_leave_the_cluster():
    with_ip_block = {p["metadata"]["name"] for p in POLICIES for rule in p["spec"].get("egress", [])
                     for peer in rule.get("to", []) if "ipBlock" in peer}
    assert with_ip_block == {"airflow-scheduler", "airflow-triggerer"}   # the seekflow-backend ServiceAccount
    for policy in POLICIES:
        for rule in policy["spec"].get("egress", []):
            if any("ipBlock" in peer for peer in rule["to"]):
                assert rule["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]


# -- the sandbox ----------------------------------------------------------------------------------------------------

def secret_refs(pod: dict) -> set[str]:
    """Every Secret a pod spec reads: envFrom, env valueFrom, secret and projected volumes."""
    text = json.dumps(pod)
    names = set(re.findall(r'"secretRef": \{"name": "([^"]+)"', text))
    names |= set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text))
    names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    names |= {s["secret"]["name"] for v in pod.get("volumes", []) for s in v.get("projected", {}).get("sources", [])
              if "secret" in s}
    return names


def test_sandbox_pod_has_no_secret_no_token_no_api_access_and_limits():
    pod = PLATFORM_PODS[SANDBOX][1]
    [container] = pod["containers"]
    assert secret_refs(pod) == set() and "envFrom" not in container and "imagePullSecrets" not in pod
    assert not any(v.get("projected") for v in pod["volumes"])
    assert not any(e["name"].startswith(("AWS_", "MLFLOW_", "AIRFLOW")) for e in container["env"])
    assert {"name": "SEEKFLOW_SANDBOX_POD", "value": "1"} in container["env"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == SANDBOX
    docs = platform_docs()
    [account] = [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == SANDBOX]
    assert account["automountServiceAccountToken"] is False
    assert not [b for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and any(s.get("name") == SANDBOX for s in b["subjects"])]
    assert container["command"] == ["python", "-m", "training.verify.service", "--host", "0.0.0.0", "--port", "8080",
                                    "--isolation", "pod"]
    assert pod["securityContext"]["runAsUser"] == 65532 and container["securityContext"]["readOnlyRootFilesystem"]
    assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["limits"])
    [tmp] = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert tmp["emptyDir"]["sizeLimit"] and {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    [image] = {c["image"] for d in docs for _, _, p in pod_templates(d) for c in p["containers"]
               if c["image"].startswith("ghcr.io/seekflow/seekflow-train:")}
    assert container["image"] == image == platform_settings().image   # the jobs' training image
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == SANDBOX]
    assert [p["port"] for p in service["spec"]["ports"]] == [8080]
    assert platform_settings().sandbox_url == "http://seekflow-sandbox:8080"


def test_sandbox_reaches_nothing_and_only_jobs_reach_it():
    labels = PLATFORM_PODS[SANDBOX][0]
    policies = specific_policies(labels)
    assert all("Egress" in p["spec"]["policyTypes"] and not p["spec"].get("egress") for p in policies)
    targets = list(PLATFORM_PODS.values()) + [(JOB_POD_LABELS, None)]
    assert not any(reachable(labels, other, port) for other, _ in targets for port in (53, 443, 5000, 8080, 8333))
    callers = {name for name, (other, _) in PLATFORM_PODS.items() if reachable(other, labels, 8080)}
    assert callers == set() and reachable(JOB_POD_LABELS, labels, 8080)
    assert not reachable(JOB_POD_LABELS, labels, 8081)


# -- RBAC: the Role holds exactly what the backend calls -------------------------------------------------------------

def called_verbs() -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, read out of operators/backends/kubernetes.py: every `_call(verb, resource, ...)`
    with literal arguments, and the verbs of `_job_call`'s dispatch tables applied to each of KINDS."""
    tree = ast.parse(Path(backend_module.__file__).read_text())
    called: dict[tuple[str, str], set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_job_call":
            verbs = {k.value for d in ast.walk(node) if isinstance(d, ast.Dict) for k in d.keys
                     if isinstance(k, ast.Constant)}
            for kind in backend_module.KINDS.values():
                called.setdefault((kind.group, kind.plural), set()).update(verbs)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_call":
            verb, resource = node.args[0], node.args[1]
            if isinstance(verb, ast.Constant) and isinstance(resource, ast.Constant):
                called.setdefault(("", resource.value), set()).add(verb.value)   # core kinds: pods, pods/log, events
            else:
                assert verb.id == "verb" and resource.attr == "resource", ast.unparse(node)   # only in _job_call
    return called


def test_role_grants_exactly_the_verbs_the_backend_calls():
    called = called_verbs()
    assert called[("", "pods")] == {"list"} and called[("jobset.x-k8s.io", "jobsets")] == {"create", "get", "list",
                                                                                             "delete"}
    [role] = [d for d in platform_docs() if d["kind"] == "Role"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] and "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == called
    # The trigger polls and kills through the backend's methods; it makes no API call of its own.
    trigger = ast.parse((REPO / "operators/triggers.py").read_text())
    attrs = {n.attr for n in ast.walk(trigger) if isinstance(n, ast.Attribute)}
    assert not {a for a in attrs if a in ("_call", "_job_call", "hook") or a.endswith(("_client", "_api"))}


# -- object store and credentials -------------------------------------------------------------------------------------

def test_seaweedfs_publishes_only_its_s3_gateway():
    docs = platform_docs()
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "seaweedfs"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8333, "s3")]
    [container] = PLATFORM_PODS["seaweedfs"][1]["containers"]
    assert container["ports"] == [{"name": "s3", "containerPort": 8333}]
    store = PLATFORM_PODS["seaweedfs"][0]
    # Its own ingress says so, whatever the other pods' egress rules allow.
    others = [labels for name, (labels, _) in PLATFORM_PODS.items() if name != "seaweedfs"] + [JOB_POD_LABELS]
    for policy in specific_policies(store):
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from") or any(selects(peer.get("podSelector", {}), labels)
                                           for peer in rule["from"] for labels in others):
                assert rule.get("ports") == [{"protocol": "TCP", "port": 8333}], policy["metadata"]["name"]
    for name, (labels, _) in {**PLATFORM_PODS, "job": (JOB_POD_LABELS, None)}.items():
        for port in (9333, 19333, 8080, 18080, 8888, 18888, 18333):   # master, volume, filer, gRPC
            assert reachable(labels, store, port) == (name == "seaweedfs"), (name, port)


def s3_identities() -> dict[str, dict]:
    [platform] = [d for d in load_documents(PLATFORM / "secrets.example.yaml")
                  if d["metadata"]["name"] == "seekflow-platform"]
    return {i["name"]: i for i in json.loads(platform["stringData"]["s3-config.json"])["identities"]}


def test_jobs_and_mlflow_have_separate_s3_identities_limited_to_their_buckets():
    secrets = {d["metadata"]["name"]: d["stringData"] for d in load_documents(PLATFORM / "secrets.example.yaml")}
    identities = s3_identities()
    assert set(identities) == {"seekflow-jobs", "seekflow-mlflow"}
    config = next(d for d in platform_docs() if d["metadata"]["name"] == "airflow-env")["data"]
    [mlflow] = PLATFORM_PODS["mlflow"][1]["containers"]
    artifacts = next(a for a in mlflow["command"] if a.startswith("--artifacts-destination="))
    buckets = {"seekflow-jobs": config["SEEKFLOW_RUN_ROOT_BASE"].split("/")[2],
               "seekflow-mlflow": artifacts.split("/")[2]}
    assert buckets == {"seekflow-jobs": "seekflow", "seekflow-mlflow": "seekflow-mlflow"}
    for name, secret in (("seekflow-jobs", "seekflow-env"), ("seekflow-mlflow", "seekflow-mlflow-server")):
        identity = identities[name]
        assert sorted(identity["actions"]) == sorted(f"{a}:{buckets[name]}" for a in ("Read", "Write", "List"))
        [keys] = identity["credentials"]
        assert (keys["accessKey"], keys["secretKey"]) == (secrets[secret]["AWS_ACCESS_KEY_ID"],
                                                          secrets[secret]["AWS_SECRET_ACCESS_KEY"])


EXPECTED_SECRETS = {
    "airflow-api-server": {"seekflow-airflow", "seekflow-platform"}, "airflow-scheduler": {"seekflow-airflow"},
    "airflow-triggerer": {"seekflow-airflow"}, "airflow-dag-processor": {"seekflow-airflow"},
    "airflow-postgres": {"seekflow-platform"}, "seaweedfs": {"seekflow-platform"},
    "mlflow": {"seekflow-mlflow-server"}, SANDBOX: set(),
}


def test_each_pod_gets_only_the_secrets_it_needs():
    assert {name: secret_refs(pod) for name, (_, pod) in PLATFORM_PODS.items()} == EXPECTED_SECRETS
    for name, (_, pod) in rendered_pods().items():
        stage = name.split(":")[1].removesuffix("_shards")
        login = "seekflow-mlflow-promoter" if stage in ("register", "promote") else "seekflow-mlflow-jobs"
        assert secret_refs(pod) == {"seekflow-env", login}, name


def test_mlflow_runs_its_basic_auth_app_with_the_admin_password_from_a_secret():
    docs = platform_docs()
    [container] = PLATFORM_PODS["mlflow"][1]["containers"]
    assert "--app-name=basic-auth" in container["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth"]
    ini = configparser.ConfigParser()
    ini.read_string(configmap["data"]["basic_auth.ini"])
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "admin_password" not in ini["mlflow"] and ini["mlflow"]["admin_username"] == "admin"
    assert ini["mlflow"]["database_uri"].startswith("sqlite:////mlflow/")   # on the PVC, not the read-only root
    secrets = {d["metadata"]["name"]: d["stringData"] for d in load_documents(PLATFORM / "secrets.example.yaml")}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(secrets["seekflow-mlflow-server"])
    jobs, promoter = secrets["seekflow-mlflow-jobs"], secrets["seekflow-mlflow-promoter"]
    assert jobs["MLFLOW_TRACKING_USERNAME"] != promoter["MLFLOW_TRACKING_USERNAME"]
    assert jobs["MLFLOW_TRACKING_PASSWORD"] != promoter["MLFLOW_TRACKING_PASSWORD"]
    assert not any(k.startswith("MLFLOW_TRACKING_USERNAME") for k in secrets["seekflow-env"])
