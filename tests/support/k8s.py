"""Validating Kubernetes manifests offline against real schemas.

- Core kinds: `kubernetes-validate`'s strict schemas (unknown fields are errors) for KUBERNETES_VERSION.
- JobSets: the openAPIV3Schema of the JobSet v0.12.0 CRD (copied into schemas/), made strict the way the API server
  is structural: an object that lists its properties and neither allows additional ones nor preserves unknown
  fields would have a misspelled field silently pruned, so here it is an error. The Job template inside is
  validated again as a real batch/v1 Job, and the names JobSet's webhook generates are checked for length.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.33"   # kubernetes-validate 1.37.0 ships 1.25 ... 1.37; JobSet v0.12 supports 1.33
JOBSET_CRD = REPO / "tests" / "k8s" / "schemas" / "jobset.x-k8s.io_jobsets.v0.12.0.yaml"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(AssertionError):
    pass


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate_core(doc: dict) -> str:
    """Validate a core-kind manifest strictly; returns the Kubernetes version it was checked against."""
    try:
        return kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        raise ManifestError(f"{doc['kind']}/{doc['metadata'].get('name')}: {where}: {err.message}") from None


def _strict(schema: dict) -> dict:
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@functools.cache
def jobset_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(JOBSET_CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_jobset(doc: dict) -> None:
    errors = sorted(jobset_validator().iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise ManifestError("\n".join(f"JobSet {'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    if doc["apiVersion"] != "jobset.x-k8s.io/v1alpha2":
        raise ManifestError(f"JobSet apiVersion {doc['apiVersion']}")
    name = doc["metadata"]["name"]
    validate_metadata(doc)
    for rjob in doc["spec"]["replicatedJobs"]:
        # The child Job, as the JobSet controller creates it, must be a valid batch/v1 Job.
        template = rjob["template"]
        validate_core({"apiVersion": "batch/v1", "kind": "Job",
                       "metadata": {**template.get("metadata", {}), "name": f"{name}-{rjob['name']}-0"},
                       "spec": template["spec"]})
        # The JobSet webhook's name rules (DNS-1035, <= 63): child Jobs and pods (plus a 5-char random suffix).
        job_spec = template["spec"]
        longest_job = f"{name}-{rjob['name']}-{rjob['replicas'] - 1}"
        longest_pod = f"{longest_job}-{job_spec.get('completions', 1) - 1}-abcde"
        for generated in (name, longest_job, longest_pod):
            if len(generated) > 63 or not DNS_1035.match(generated):
                raise ManifestError(f"JobSet {name}: generated name {generated!r} is not a DNS-1035 label <= 63")


def validate_metadata(doc: dict) -> None:
    """Formats JSON schemas leave out: object names and label syntax."""
    meta = doc["metadata"]
    if not DNS_SUBDOMAIN.match(meta["name"]) or len(meta["name"]) > 253:
        raise ManifestError(f"{doc['kind']}: name {meta['name']!r} is not a DNS-1123 subdomain")
    for labels in _all_labels(doc):
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            if (prefix and not DNS_SUBDOMAIN.match(prefix)) or len(name) > 63 or not LABEL_NAME.match(name):
                raise ManifestError(f"{doc['kind']}/{meta['name']}: bad label key {key!r}")
            if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
                raise ManifestError(f"{doc['kind']}/{meta['name']}: bad label value {key}={value!r}")


def _all_labels(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("labels", "matchLabels") and isinstance(value, dict):
                found.append(value)
            else:
                found += _all_labels(value)
    elif isinstance(node, list):
        for item in node:
            found += _all_labels(item)
    return found


def validate_manifest(doc: dict) -> str:
    """Validate one manifest of any kind seekflow uses; returns what it was validated against."""
    if doc.get("kind") == "JobSet":
        validate_jobset(doc)
        return "JobSet v0.12.0 CRD"
    validate_metadata(doc)
    return validate_core(doc)


def expand_k8s_vars(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of env values, command and args (k8s.io/kubernetes third_party expansion):
    `$$` -> `$`, `$(NAME)` -> env[NAME] (left as is when undefined), any other `$` stays."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(env.get(name, f"$({name})"))
                    i = end + 1
                    continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(value[i])
        i += 1
    return "".join(out)
