"""A loopback fake of the Kubernetes API for what KubernetesBackend touches: JobSets, Jobs, their pods, logs, events.

No kube-apiserver can run here, so this stands in for one: real paths, real object and `Status` shapes, label and
field selectors, DELETE with propagation. A tiny "controller" gives each created job its pods and moves them through
Pending → Running → Succeeded/Failed as its scripted `Outcome` says (state is computed lazily from the clock at each
request, so no background thread). Faults are injected per k8s verb + resource; every request is recorded.

    fake = FakeKube().start(); fake.outcome = Outcome.fail(exit_code=3, lines=["boom"])
    fake.inject("create", "jobsets", 503, times=2); ...; fake.count("create", "jobsets") == 1
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

KINDS = {"jobsets": ("jobset.x-k8s.io/v1alpha2", "JobSet"), "jobs": ("batch/v1", "Job")}   # apiVersion, kind
GROUPS = {"jobsets": "jobset.x-k8s.io", "jobs": "batch", "pods": "", "events": ""}
_ROUTE = re.compile(r"^(?:/apis/jobset\.x-k8s\.io/v1alpha2|/apis/batch/v1|/api/v1)/namespaces/([^/]+)/"
                    r"(jobsets|jobs|pods|events)(?:/([^/]+))?(?:/(log|status))?$")


def _ts(t: float | None = None) -> str:
    return datetime.fromtimestamp(t if t is not None else time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What the fake controller does with the jobs created next. `after_s=None`: run until `FakeKube.finish()`."""

    result: str = "succeed"   # succeed | fail | pending
    lines: list[str] = field(default_factory=lambda: ["step 1 loss 2.0", 'SEEKFLOW_RESULT {"final_loss": 1.5}'])
    exit_code: int = 0
    after_s: float | None = 0.2
    pending_reason: str = "Unschedulable"   # or ErrImagePull / ImagePullBackOff
    events: list[tuple[str, str]] = field(default_factory=list)   # (reason, message), Warning events on each pod

    @classmethod
    def succeed(cls, lines: list[str] | None = None, after_s: float | None = 0.2) -> Outcome:
        return cls("succeed", lines if lines is not None else cls().lines, 0, after_s)

    @classmethod
    def fail(cls, exit_code: int = 1, lines: list[str] | None = None, after_s: float | None = 0.2) -> Outcome:
        return cls("fail", lines or ["Traceback (most recent call last):", "RuntimeError: boom"], exit_code, after_s)

    @classmethod
    def pending(cls, reason: str = "Unschedulable", message: str | None = None) -> Outcome:
        if reason == "Unschedulable":
            events = [("FailedScheduling", message or "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. "
                                                      "preemption: 0/4 nodes are available.")]
        else:
            events = [("Failed", message or 'Failed to pull image "ghcr.io/x/seekflow:nope": not found'),
                      ("BackOff", 'Back-off pulling image "ghcr.io/x/seekflow:nope"')]
        return cls("pending", [], 0, None, reason, events)


@dataclass
class Request:
    method: str
    verb: str
    resource: str
    path: str
    query: dict[str, str]
    body: dict | None
    code: int = 0   # the status it was answered with


def status_body(code: int, reason: str, message: str, **details) -> dict:
    """A metav1.Status, the body every real API error comes with."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details, "code": code}


def _matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: dict, dotted: str):
    for part in dotted.split("."):
        obj = obj.get(part, {}) if isinstance(obj, dict) else {}
    return obj if obj != {} else None


class FakeKube:
    def __init__(self):
        self.outcome = Outcome()
        self.objects: dict[tuple[str, str, str], dict] = {}   # (plural, ns, name) -> JobSet / Job
        self.pods: dict[tuple[str, str], dict] = {}
        self.requests: list[Request] = []
        self._meta: dict[tuple[str, str, str], tuple[Outcome, float]] = {}   # job -> (outcome, created at)
        self._finished: set[tuple[str, str, str]] = set()   # jobs released by finish()
        self._faults: list[list] = []   # [verb, resource, code, times, delay_s]
        self._after: list[tuple] = []   # (verb, resource, action)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeKube:
        handler = type("Handler", (_Handler,), {"fake": self})   # one class per server: it knows its fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}]}))
        return path

    # ---- scripting and assertions ----------------------------------------------------------------------------
    def inject(self, verb: str, resource: str, code: int, times: int = 1, delay_s: float = 0.0) -> None:
        """Answer the next `times` `verb resource` requests with `code` (0: handle normally, after `delay_s`)."""
        with self._lock:
            self._faults.append([verb, resource, code, times, delay_s])

    def after(self, verb: str, resource: str, action) -> None:
        """Run `action()` once, right after the next `verb resource` request is answered (to script races)."""
        with self._lock:
            self._after.append((verb, resource, action))

    def finish(self, plural: str, namespace: str, name: str) -> None:
        """Let a job scripted with `after_s=None` reach its outcome now."""
        with self._lock:
            self._finished.add((plural, namespace, name))

    def count(self, verb: str, resource: str) -> int:
        return sum(1 for r in self.requests if r.verb == verb and r.resource == resource)

    def codes(self, verb: str, resource: str) -> list[int]:
        return [r.code for r in self.calls(verb, resource)]

    def calls(self, verb: str, resource: str) -> list[Request]:
        return [r for r in self.requests if r.verb == verb and r.resource == resource]

    # ---- the fake controller ---------------------------------------------------------------------------------
    def _create_pods(self, plural: str, ns: str, obj: dict) -> None:
        name, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
        if plural == "jobsets":
            groups = [(rj["name"], k, rj["template"]) for rj in obj["spec"]["replicatedJobs"]
                      for k in range(rj.get("replicas", 1))]
        else:
            groups = [(None, 0, obj)]
        order = 0
        for rj_name, k, job in groups:
            job_spec = job["spec"]
            job_name = f"{name}-{rj_name}-{k}" if rj_name else name
            for idx in range(min(job_spec.get("parallelism", 1), job_spec.get("completions", 1) or 1)):
                tmpl = job_spec["template"]
                labels = {**tmpl.get("metadata", {}).get("labels", {}), "job-name": job_name,
                          "batch.kubernetes.io/job-name": job_name, "controller-uid": uid,
                          "batch.kubernetes.io/job-completion-index": str(idx)}
                if rj_name:
                    labels.update({"jobset.sigs.k8s.io/jobset-name": name,
                                   "jobset.sigs.k8s.io/replicatedjob-name": rj_name,
                                   "jobset.sigs.k8s.io/job-index": str(k),
                                   "jobset.sigs.k8s.io/restart-attempt": "0"})
                pod_name = f"{job_name}-{idx}-{uuid.uuid4().hex[:5]}"
                self.pods[(ns, pod_name)] = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels,
                                 "creationTimestamp": _ts(), "ownerReferences": [{
                                     "apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                     "controller": True, "blockOwnerDeletion": True}]},
                    "spec": tmpl["spec"], "status": {"phase": "Pending"}, "_job": (plural, ns, name),
                    "_order": order}
                order += 1

    def _state(self, key: tuple[str, str, str]) -> str:
        outcome, created = self._meta[key]
        if outcome.result == "pending":
            return "pending"
        if outcome.after_s is None and key not in self._finished:
            return "running"
        if outcome.after_s is not None and time.monotonic() - created < outcome.after_s:
            return "running"
        return outcome.result

    def _pod_view(self, pod: dict) -> dict:
        """The pod as the API would show it now (its job's outcome applied)."""
        key = pod["_job"]
        outcome, _ = self._meta[key]
        state = self._state(key) if key in self._meta else "running"
        container = pod["spec"]["containers"][0]["name"]
        cs = {"name": container, "image": pod["spec"]["containers"][0].get("image", ""), "imageID": "",
              "restartCount": 0, "ready": state == "running", "started": state == "running"}
        status: dict = {"phase": "Running", "startTime": pod["metadata"]["creationTimestamp"], "podIP": "10.0.0.7"}
        if state == "pending" and outcome.pending_reason == "Unschedulable":
            msg = outcome.events[0][1] if outcome.events else ""
            status = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "reason": "Unschedulable", "message": msg}]}
        elif state == "pending":
            status = {"phase": "Pending", "containerStatuses": [{**cs, "state": {"waiting": {
                "reason": outcome.pending_reason, "message": outcome.events[0][1] if outcome.events else ""}}}]}
        elif state == "running":
            status["containerStatuses"] = [{**cs, "state": {"running": {"startedAt": status["startTime"]}}}]
        else:
            code = outcome.exit_code if state == "fail" else 0
            status["phase"] = "Failed" if code else "Succeeded"
            status["containerStatuses"] = [{**cs, "state": {"terminated": {
                "exitCode": code, "reason": "Error" if code else "Completed", "finishedAt": _ts()}}}]
        return {**{k: v for k, v in pod.items() if not k.startswith("_")}, "status": status}

    def _job_view(self, plural: str, key: tuple[str, str, str]) -> dict:
        obj = self.objects[key]
        state, n = self._state(key), sum(1 for p in self.pods.values() if p["_job"] == key)
        now = _ts()

        def cond(type_, reason, message):
            return {"type": type_, "status": "True", "reason": reason, "message": message,
                    "lastTransitionTime": now, "lastProbeTime": now}
        if plural == "jobs":
            status = {"startTime": obj["metadata"]["creationTimestamp"], "active": n, "ready": 0}
            if state == "succeed":
                status = {"startTime": status["startTime"], "succeeded": n, "completionTime": now,
                          "conditions": [cond("SuccessCriteriaMet", "CompletionsReached", "Reached expected "
                                              "number of succeeded pods"),
                                         cond("Complete", "CompletionsReached", "Reached expected number of "
                                              "succeeded pods")]}
            elif state == "fail":
                status = {"startTime": status["startTime"], "failed": 1, "conditions": [
                    cond("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                    cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]}
        else:
            rjs = [{"name": rj["name"], "active": rj.get("replicas", 1), "ready": 0, "succeeded": 0, "failed": 0,
                    "suspended": 0} for rj in obj["spec"]["replicatedJobs"]]
            status = {"restarts": 0, "replicatedJobsStatus": rjs}
            if state == "succeed":
                status.update(terminalState="Completed", conditions=[cond(
                    "Completed", "AllJobsCompleted", "jobset completed successfully")])
            elif state == "fail":
                restarts = obj["spec"].get("failurePolicy", {}).get("maxRestarts", 0)
                status.update(terminalState="Failed", restarts=restarts, conditions=[cond(
                    "Failed", "FailedJobs", "jobset failed due to one or more job failures")])
        return {**obj, "status": status}

    def _events(self, ns: str, selector: str) -> list[dict]:
        wanted = dict(t.split("=", 1) for t in selector.split(",") if "=" in t)
        items = []
        for (pns, pname), pod in self.pods.items():
            if pns != ns or pod["_job"] not in self._meta:
                continue
            outcome, _ = self._meta[pod["_job"]]
            evs = [("Normal", "Scheduled", f"Successfully assigned {ns}/{pname} to gpu-node-1")] \
                if self._state(pod["_job"]) != "pending" or outcome.pending_reason != "Unschedulable" else []
            if self._state(pod["_job"]) == "pending":
                evs += [("Warning", r, m) for r, m in outcome.events]
            for i, (type_, reason, message) in enumerate(evs):
                ev = {"metadata": {"name": f"{pname}.{i:04x}", "namespace": ns},
                      "involvedObject": {"kind": "Pod", "name": pname, "namespace": ns, "apiVersion": "v1"},
                      "reason": reason, "message": message, "type": type_, "count": 1,
                      "firstTimestamp": pod["metadata"]["creationTimestamp"], "lastTimestamp": _ts(),
                      "source": {"component": "default-scheduler" if reason == "FailedScheduling" else "kubelet"}}
                if all(_field(ev, k) == v for k, v in wanted.items()):
                    items.append(ev)
        return items

    # ---- request handling ------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: dict | None) -> tuple[int, object]:
        if path in ("/api", "/apis", "/version"):
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"}
        m = _ROUTE.match(path)
        if not m:
            return 404, status_body(404, "NotFound", "the server could not find the requested resource")
        ns, plural, name, sub = m.groups()
        verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch"}.get(method, "get" if name else "list")
        resource = f"{plural}/{sub}" if sub else plural
        request = Request(method, verb, resource, path, query, body)
        with self._lock:
            self.requests.append(request)
            fault = next((f for f in self._faults if f[0] == verb and f[1] == resource and f[3] > 0), None)
            if fault:
                fault[3] -= 1
        if fault and fault[2]:
            request.code, out = self._fault(fault[2], verb, plural, ns, name)
            return request.code, out
        with self._lock:
            code, out = self._dispatch(method, ns, plural, name, sub, query, body)
        request.code = code
        if fault and fault[4]:
            time.sleep(fault[4])   # the work is done; only the answer is late (a client-side timeout)
        with self._lock:
            due = [a for a in self._after if a[:2] == (verb, resource)][:1]
            self._after = [a for a in self._after if a not in due]
        for _, _, action in due:
            action()
        return code, out

    def _fault(self, code: int, verb: str, plural: str, ns: str, name: str | None) -> tuple[int, dict]:
        group = GROUPS[plural]
        res = f"{plural}.{group}" if group else plural
        if code == 403:
            msg = (f'{res} is forbidden: User "system:serviceaccount:{ns}:airflow-worker" cannot {verb} resource '
                   f'"{plural}" in API group "{group}" in the namespace "{ns}"')
            return 403, status_body(403, "Forbidden", msg, group=group, kind=plural, name=name or "")
        reason = {500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout", 429: "TooManyRequests"}
        return code, status_body(code, reason.get(code, "InternalError"), f"injected {code} for {verb} {res}")

    def _dispatch(self, method, ns, plural, name, sub, query, body):
        if plural == "events":
            return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                         "items": self._events(ns, query.get("fieldSelector", ""))}
        if plural == "pods":
            return self._pods(method, ns, name, sub, query)
        api_version, kind = KINDS[plural]
        key = (plural, ns, name)
        if method == "POST":
            return self._create(plural, ns, body, api_version, kind)
        if method == "GET" and name is None:
            items = [self._job_view(plural, k) for k in self.objects if k[:2] == (plural, ns)
                     and _matches(self.objects[k]["metadata"].get("labels", {}), query.get("labelSelector", ""))]
            return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {"resourceVersion": "1"},
                         "items": items}
        if key not in self.objects:
            return 404, status_body(404, "NotFound", f'{plural}.{GROUPS[plural]} "{name}" not found',
                                    name=name, group=GROUPS[plural], kind=plural)
        if method == "GET":
            return 200, self._job_view(plural, key)
        if method == "DELETE":
            obj = self.objects.pop(key)
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
            if policy != "Orphan":
                for pk in [pk for pk, p in self.pods.items() if p["_job"] == key]:
                    del self.pods[pk]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": GROUPS[plural], "kind": plural,
                                     "uid": obj["metadata"]["uid"]}}
        return 405, status_body(405, "MethodNotAllowed", f"{method} not supported by the fake")

    def _create(self, plural, ns, body, api_version, kind):
        meta = (body or {}).get("metadata", {})
        name = meta.get("name")
        if body.get("apiVersion") != api_version or body.get("kind") != kind or not name:
            return 422, status_body(422, "Invalid", f"{kind} is invalid: apiVersion/kind/metadata.name",
                                    kind=kind, name=name or "")
        if meta.get("namespace", ns) != ns:
            return 400, status_body(400, "BadRequest", "the namespace of the provided object does not match "
                                                        "the namespace sent on the request")
        if (plural, ns, name) in self.objects:
            return 409, status_body(409, "AlreadyExists", f'{plural}.{GROUPS[plural]} "{name}" already exists',
                                    name=name, group=GROUPS[plural], kind=plural)
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_ts(), resourceVersion="1",
                               generation=1)
        self.objects[(plural, ns, name)] = obj
        self._meta[(plural, ns, name)] = (self.outcome, time.monotonic())
        self._create_pods(plural, ns, obj)
        return 201, obj

    def _pods(self, method, ns, name, sub, query):
        if name is None:
            sel = query.get("labelSelector", "")
            items = [self._pod_view(p) for (pns, _), p in sorted(self.pods.items(), key=lambda kv: kv[1]["_order"])
                     if pns == ns and _matches(p["metadata"]["labels"], sel)]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
        pod = self.pods.get((ns, name))
        if pod is None:
            return 404, status_body(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        view = self._pod_view(pod)
        if sub != "log":
            return 200, view
        if view["status"]["phase"] == "Pending":
            return 400, status_body(400, "BadRequest", f'container "{pod["spec"]["containers"][0]["name"]}" in '
                                                        f'pod "{name}" is waiting to start: ContainerCreating')
        outcome, _ = self._meta[pod["_job"]]
        lines = outcome.lines if pod["_order"] == 0 else [f"worker {pod['_order']} ready"]
        if view["status"]["phase"] == "Running":
            lines = lines[: len(lines) // 2]
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):]
        return 200, "".join(f"{line}\n" for line in lines).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKube

    def log_message(self, *args):
        pass

    def _do(self):
        u = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(u.query).items()}
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        code, out = self.fake.handle(self.command, u.path, query, body)
        data = out if isinstance(out, bytes) else json.dumps(out).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(out, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client gave up waiting (an injected delay): that was the point

    do_GET = do_POST = do_DELETE = do_PATCH = _do
