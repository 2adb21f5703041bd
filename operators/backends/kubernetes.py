"""KubernetesBackend: a stage runs as a JobSet (multi-node torchrun) or an Indexed Job (CPU shards) on a cluster.

The manifests come from `k8s_render`; this module is the runtime half: submit, poll, logs, cleanup. Clients come
from the cncf-kubernetes provider's `KubernetesHook` (its Airflow connection decides kubeconfig / in-cluster).
Following the provider's decision records, a restarted worker **reattaches** to a job that is still running instead
of submitting a second one, and pod logs are **collected before anything is deleted**.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Callable

from operators.backends.base import FAILURE_PREFIX, JobFailed, JobSpec, parse_result
from operators.backends.k8s_render import JOB_LABEL, TRY_LABEL, job_labels, render
from operators.backends.k8s_settings import KubernetesSettings

TRANSIENT = {429, 500, 502, 503, 504}
# Failures decided here or by the trigger (the task's execution_timeout), not by the job: the job is still there.
GAVE_UP = {"PendingTimeout", "NoPods", "Timeout"}


class KubernetesApiError(RuntimeError):
    """The API refused or kept failing a request; the message names the verb, the resource and the namespace."""


@dataclass(frozen=True)
class JobHandle:
    name: str
    namespace: str
    kind: str   # "JobSet" | "Job"


@dataclass(frozen=True)
class _Kind:
    group: str
    version: str
    plural: str
    pod_label: str   # the label the controller puts on the job's pods

    @property
    def resource(self) -> str:   # as RBAC and error messages spell it
        return f"{self.plural}.{self.group}"


KINDS = {"JobSet": _Kind("jobset.x-k8s.io", "v1alpha2", "jobsets", "jobset.sigs.k8s.io/jobset-name"),
         "Job": _Kind("batch", "v1", "jobs", "job-name")}


def _age_s(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    return time.time() - datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _condition(obj: dict, *types: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions") or []
                 if c.get("type") in types and c.get("status") == "True"), None)


def _leader_order(pod: dict) -> tuple:
    labels = pod["metadata"].get("labels", {})
    return (int(labels.get("jobset.sigs.k8s.io/job-index", 0)),
            int(labels.get("batch.kubernetes.io/job-completion-index", 0)), pod["metadata"]["name"])


def _restart_attempt(pod: dict) -> int:
    return int(pod["metadata"].get("labels", {}).get("jobset.sigs.k8s.io/restart-attempt", 0))


class KubernetesBackend:
    def __init__(self, settings: KubernetesSettings | None = None, *, api_attempts: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, request_timeout_s: float = 30.0, log_tail_lines: int = 10_000,
                 failure_tail_lines: int = 40):
        self.settings = settings or KubernetesSettings()
        self.api_attempts = api_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        self.log_tail_lines = log_tail_lines      # a multi-day run's log is huge; its end holds the result
        self.failure_tail_lines = failure_tail_lines
        self._handle: JobHandle | None = None
        self._killed = False

    # ---- clients ---------------------------------------------------------------------------------------------
    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.settings.conn_id)

    def _call(self, verb: str, resource: str, namespace: str, fn: Callable, *args, **kwargs):
        """One API call. 5xx, 429 and timeouts are retried with exponential backoff; a 403 names what RBAC lacks."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        for attempt in range(1, self.api_attempts + 1):
            try:
                return fn(*args, _request_timeout=self.request_timeout_s, **kwargs)
            except ApiException as exc:
                if exc.status == 403:
                    raise KubernetesApiError(
                        f"forbidden: cannot {verb} {resource} in namespace {namespace} — check the RBAC Role in "
                        f"k8s/platform (API: {exc.reason})") from exc
                if exc.status not in TRANSIENT or attempt == self.api_attempts:
                    raise
                why = f"HTTP {exc.status}"
            except HTTPError as exc:   # timeouts, resets: the request may or may not have reached the server
                if attempt == self.api_attempts:
                    raise KubernetesApiError(f"{verb} {resource} in namespace {namespace} failed after "
                                             f"{attempt} attempts: {exc}") from exc
                why = type(exc).__name__
            delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
            self.hook.log.warning("%s %s: %s, retry %d/%d in %.1fs", verb, resource, why, attempt,
                                  self.api_attempts - 1, delay)
            time.sleep(delay)

    def _dict(self, obj) -> dict:
        return self.hook.api_client.sanitize_for_serialization(obj)

    # ---- job objects: JobSets through CustomObjectsApi, Jobs through BatchV1Api, both as plain dicts ----------
    def _job_call(self, verb: str, kind: str, namespace: str, name: str | None = None, **kwargs) -> dict:
        k = KINDS[kind]
        if kind == "Job":
            api = self.hook.batch_v1_client
            fn, args = {"create": (api.create_namespaced_job, (namespace,)),
                        "get": (api.read_namespaced_job, (name, namespace)),
                        "list": (api.list_namespaced_job, (namespace,)),
                        "delete": (api.delete_namespaced_job, (name, namespace))}[verb]
        else:
            api, where = self.hook.custom_object_client, (k.group, k.version, namespace, k.plural)
            fn, args = {"create": (api.create_namespaced_custom_object, where),
                        "get": (api.get_namespaced_custom_object, (*where, name)),
                        "list": (api.list_namespaced_custom_object, where),
                        "delete": (api.delete_namespaced_custom_object, (*where, name))}[verb]
        return self._dict(self._call(verb, k.resource, namespace, fn, *args, **kwargs))

    def get(self, handle: JobHandle) -> dict | None:
        """The job object (camelCase, as the API spells it), or None if it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._job_call("get", handle.kind, handle.namespace, handle.name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, handle: JobHandle) -> None:
        """Delete the job; Background propagation lets the garbage collector remove its child Jobs and pods."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._job_call("delete", handle.kind, handle.namespace, handle.name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ---- submit and reattach ---------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobHandle:
        """Create the job, unless this task's job already exists: then reattach to it (never a second job)."""
        from kubernetes.client.exceptions import ApiException

        manifest = render(spec, self.settings)
        meta = manifest["metadata"]
        handle = JobHandle(meta["name"], meta["namespace"], manifest["kind"])
        existing = self.find_existing(handle, spec)
        if existing is None:
            try:
                self._job_call("create", handle.kind, handle.namespace, body=manifest)
                self.hook.log.info("created %s %s/%s", handle.kind, handle.namespace, handle.name)
                existing = handle
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Created by an earlier attempt whose answer we lost (a timeout), or by a restarted worker.
                self.hook.log.info("%s %s/%s already exists: reattaching", handle.kind, handle.namespace, handle.name)
                existing = handle
        self._handle = existing
        return existing

    def find_existing(self, handle: JobHandle, spec: JobSpec) -> JobHandle | None:
        """This try's job (same name, any state), or a still-running job of an earlier try of the same task."""
        if self.get(handle) is not None:
            self.hook.log.info("reattaching to %s %s/%s", handle.kind, handle.namespace, handle.name)
            return handle
        # Same dag/task/run (and stage), any try: drop the labels a retry changes.
        identity = {k: v for k, v in job_labels(spec).items() if k not in (TRY_LABEL, JOB_LABEL)}
        selector = ",".join(f"{k}={v}" for k, v in sorted(identity.items()))
        found = self._job_call("list", handle.kind, handle.namespace, label_selector=selector).get("items", [])
        running = [o for o in found if self._terminal(handle.kind, o) is None
                   and not o["metadata"].get("deletionTimestamp")]
        if not running:
            return None
        newest = max(running, key=lambda o: o["metadata"].get("creationTimestamp") or "")
        self.hook.log.info("reattaching to still-running %s %s of an earlier try", handle.kind,
                           newest["metadata"]["name"])
        return JobHandle(newest["metadata"]["name"], handle.namespace, handle.kind)

    # ---- status ----------------------------------------------------------------------------------------------
    @staticmethod
    def _terminal(kind: str, obj: dict) -> dict | None:
        done = _condition(obj, "Complete" if kind == "Job" else "Completed")
        if done:
            return {"status": "succeeded", "reason": done.get("reason") or "Completed",
                    "message": done.get("message") or ""}
        failed = _condition(obj, "Failed")
        if failed:
            return {"status": "failed", "reason": failed.get("reason") or "Failed",
                    "message": failed.get("message") or ""}
        return None

    def pods(self, handle: JobHandle) -> list[dict]:
        """The job's pods, leader (index 0) first; after a JobSet restart, only the latest attempt's pods."""
        selector = f"{KINDS[handle.kind].pod_label}={handle.name}"
        out = self._call("list", "pods", handle.namespace, self.hook.core_v1_client.list_namespaced_pod,
                         handle.namespace, label_selector=selector)
        pods = self._dict(out).get("items", [])
        latest = max(map(_restart_attempt, pods), default=0)
        return sorted((p for p in pods if _restart_attempt(p) == latest), key=_leader_order)

    def events(self, namespace: str, name: str) -> list[str]:
        out = self._call("list", "events", namespace, self.hook.core_v1_client.list_namespaced_event, namespace,
                         field_selector=f"involvedObject.name={name}")
        return [f"{e.get('type', '')} {e.get('reason', '')}: {e.get('message', '')}"
                for e in self._dict(out).get("items", [])]

    def poll(self, handle: JobHandle) -> dict:
        """{"status": running | succeeded | failed, "reason", "message"}. Stuck Pending too long counts as failed."""
        obj = self.get(handle)
        if obj is None:
            return {"status": "failed", "reason": "NotFound",
                    "message": f"{handle.kind} {handle.namespace}/{handle.name} no longer exists (deleted?)"}
        done = self._terminal(handle.kind, obj)
        if done:
            return done
        pods = self.pods(handle)
        timeout = self.settings.pending_timeout_s
        if not pods and _age_s(obj["metadata"].get("creationTimestamp")) > timeout:
            events = "\n  ".join(self.events(handle.namespace, handle.name)) or "(none)"
            return {"status": "failed", "reason": "NoPods", "message": (
                f"{handle.kind} {handle.name} has no pods after {timeout:.0f}s (is the JobSet controller "
                f"installed? a quota?); events:\n  {events}")}
        for pod in pods:
            age = _age_s(pod["metadata"].get("creationTimestamp"))
            if pod.get("status", {}).get("phase") == "Pending" and age > timeout:
                name = pod["metadata"]["name"]
                events = "\n  ".join(self.events(handle.namespace, name)) or "(none)"
                return {"status": "failed", "reason": "PendingTimeout", "message": (
                    f"pod {name} stuck Pending for {age:.0f}s (pending_timeout_s={timeout:g}): "
                    f"{_pending_reason(pod)}; events:\n  {events}")}
        phases = Counter(pod.get("status", {}).get("phase", "Unknown") for pod in pods)
        summary = ", ".join(f"{n} {phase}" for phase, n in sorted(phases.items())) or "no pods yet"
        return {"status": "running", "reason": summary, "message": ""}

    # ---- logs, cleanup, kill ---------------------------------------------------------------------------------
    def pod_log(self, namespace: str, pod: dict) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]["name"]
        try:   # _preload_content=False: the client would json.loads() a log that happens to be valid JSON
            resp = self._call("get", "pods/log", namespace, self.hook.core_v1_client.read_namespaced_pod_log,
                              name, namespace, container=container, tail_lines=self.log_tail_lines,
                              _preload_content=False)
        except ApiException as exc:
            if exc.status in (400, 404):   # never started (Pending) or already gone
                return [f"(no log for pod {name}: HTTP {exc.status})"]
            raise
        return resp.data.decode("utf-8", "replace").splitlines()

    def logs(self, handle: JobHandle, all_pods: bool = False) -> list[str]:
        """The leader pod's log lines; with `all_pods`, every pod's, each line prefixed with its pod."""
        pods = self.pods(handle)
        if not all_pods:
            return self.pod_log(handle.namespace, pods[0]) if pods else []
        return [f"[{p['metadata']['name']}] {line}" for p in pods for line in self.pod_log(handle.namespace, p)]

    def cleanup(self, handle: JobHandle) -> None:
        if self.settings.on_finish_action == "delete":
            self.delete(handle)

    def kill(self, handle: JobHandle | None = None) -> None:
        """Delete this task's job (on_kill), whatever on_finish_action says."""
        self._killed = True
        handle = handle or self._handle
        if handle is not None:
            self.delete(handle)

    def finish(self, handle: JobHandle, status: dict, log: Callable[[str], None]) -> dict:
        """Copy the pods' logs into `log` *before* any deletion, apply on_finish_action, return the stage result.

        Raises JobFailed, with the failing pod's last lines, when the job failed."""
        failed = status["status"] != "succeeded"
        collected: list[tuple[dict, list[str]]] = []
        try:
            pods = self.pods(handle)
            # The leader always (its last SEEKFLOW_RESULT line is the result); the others only when they failed.
            for pod in pods[:1] + ([p for p in pods[1:] if _exit_code(p)] if failed else []):
                lines = self.pod_log(handle.namespace, pod)
                log(f"----- {handle.kind} {handle.name}: log of pod {pod['metadata']['name']} -----")
                for line in lines:
                    log(line)
                collected.append((pod, lines))
        except Exception as exc:   # noqa: BLE001 - a log we cannot read must not hide the job's outcome
            log(f"could not collect the pod logs: {exc}")
        result: dict | None = None
        for line in collected[0][1] if collected else []:
            result = parse_result(line) or result
        if failed:
            log(f"{handle.kind} {handle.name} failed: {status.get('reason')}: {status.get('message')}")
        if status.get("reason") in GAVE_UP:
            self.delete(handle)   # it never ran, and kept it would block a retry's reattach: always delete
        else:
            self.cleanup(handle)
        if self._killed:
            raise JobFailed(f"{handle.kind} {handle.name}: killed")
        if failed:
            pod, lines = next((c for c in collected if _exit_code(c[0])), collected[0] if collected else ({}, []))
            who = pod.get("metadata", {}).get("name", "no pod")
            last = "\n".join(lines[-self.failure_tail_lines:]) or "(no output)"
            bad_input = any(line.startswith(FAILURE_PREFIX) for _, pod_lines in collected for line in pod_lines)
            raise JobFailed(f"{handle.kind} {handle.namespace}/{handle.name} failed ({status.get('reason')}: "
                            f"{status.get('message')}); last output of {who}:\n{last}", permanent=bad_input)
        return result or {}

    def wait(self, handle: JobHandle, log: Callable[[str], None]) -> dict:
        """Poll until the job is done (the non-deferrable path); log each change of state."""
        last = None
        while True:
            status = self.poll(handle)
            if status["status"] != "running" or self._killed:
                return status
            if status["reason"] != last:
                log(f"{handle.kind} {handle.name}: {status['reason']}")
                last = status["reason"]
            time.sleep(self.settings.poll_interval_s)

    def run(self, spec: JobSpec, log: Callable[[str], None]) -> dict:
        handle = self.submit(spec)
        log(f"kubernetes backend: {handle.kind} {handle.namespace}/{handle.name}")
        return self.finish(handle, self.wait(handle, log), log)


def _exit_code(pod: dict) -> int:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode"):
            return term["exitCode"]
    return 0


def _pending_reason(pod: dict) -> str:
    status = pod.get("status", {})
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason')}: {cond.get('message', '')}".rstrip(": ")
    return "Pending"
