"""JobCompletionTrigger: waits in the triggerer for a Kubernetes job to finish, so no worker slot is held meanwhile.

It is persisted as (classpath, kwargs) and may be re-created on another triggerer at any time, so it keeps no state
of its own: each poll asks the API (the Pending clock is the pods' creation time, not the trigger's). The sync
client runs in a thread (`asyncio.to_thread`), reusing `KubernetesBackend.poll` — one status logic for both paths.

It never leaves a job without an owner:
- a failed poll is retried with exponential backoff (`poll_attempts`, `poll_backoff_s`); an error the API will
  repeat (403, 404, 400...) is not. When the polls give up, the trigger deletes the job and then reports the error:
  a retry of the task submits a fresh job (stages are idempotent, training resumes from its checkpoint);
- past `deadline` (the task's execution_timeout, which Airflow does not apply while a task is deferred) it reports
  the job as failed with reason `Timeout`; `execute_complete` collects the pod logs first, then deletes the job.
"""
from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from functools import cached_property
from typing import Any, AsyncIterator, Callable

from airflow.triggers.base import BaseTrigger, TriggerEvent

MAX_BACKOFF_S = 120.0
PERMANENT_STATUS = {400, 401, 403, 404, 405, 409, 410, 422}   # the API would answer the same again


def is_transient(exc: BaseException) -> bool:
    """Worth another poll: 5xx, 429, timeouts, resets, an unreachable server. Not: what RBAC or the API refuses."""
    from kubernetes.client.exceptions import ApiException

    from operators.backends.kubernetes import KubernetesApiError

    if isinstance(exc, ApiException):
        return exc.status not in PERMANENT_STATUS
    if isinstance(exc, KubernetesApiError):
        return not str(exc).startswith("forbidden")
    return True


class JobCompletionTrigger(BaseTrigger):
    def __init__(self, *, name: str, namespace: str, kind: str, settings: dict[str, Any], started_at: float,
                 deadline: float | None = None, poll_attempts: int = 5, poll_backoff_s: float = 5.0):
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.kind = kind
        self.settings = settings          # KubernetesSettings as JSON (it holds no secrets: only a Secret's name)
        self.started_at = started_at      # when the task submitted (epoch seconds; shown in the log)
        self.deadline = deadline          # epoch seconds: the task's execution_timeout runs out (None: never)
        self.poll_attempts = max(1, poll_attempts)   # failed polls in a row before giving up (and deleting the job)
        self.poll_backoff_s = poll_backoff_s         # wait after the first failed poll; doubles, at most 2 minutes

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"name": self.name, "namespace": self.namespace, "kind": self.kind, "settings": self.settings,
                 "started_at": self.started_at, "deadline": self.deadline, "poll_attempts": self.poll_attempts,
                 "poll_backoff_s": self.poll_backoff_s})

    @cached_property
    def backend(self):
        from operators.backends.k8s_settings import KubernetesSettings
        from operators.backends.kubernetes import KubernetesBackend

        # One request per call: the retrying is ours (below), so the attempts and the backoff are the trigger's.
        return KubernetesBackend(KubernetesSettings.model_validate(self.settings), api_attempts=1)

    @property
    def handle(self):
        from operators.backends.kubernetes import JobHandle

        return JobHandle(self.name, self.namespace, self.kind)

    @property
    def what(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def _event(self, status: str, reason: str, message: str, **extra) -> TriggerEvent:
        return TriggerEvent({"status": status, "reason": reason, "message": message, "name": self.name,
                             "namespace": self.namespace, "kind": self.kind, **extra})

    async def _retrying(self, call: Callable[[], Any], doing: str) -> Any:
        """`call()` in a thread; a transient failure is retried with backoff, up to `poll_attempts` in all."""
        for attempt in range(1, self.poll_attempts + 1):
            try:
                return await asyncio.to_thread(call)
            except Exception as exc:   # noqa: BLE001 - classified below; the last one is raised
                if attempt == self.poll_attempts or not is_transient(exc):
                    raise
                delay = min(self.poll_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                self.log.warning("%s %s failed (%s: %s); retry %d/%d in %.1fs", doing, self.what,
                                 type(exc).__name__, exc, attempt, self.poll_attempts - 1, delay)
                await asyncio.sleep(delay)

    async def _delete(self) -> tuple[bool, str]:
        try:
            await self._retrying(lambda: self.backend.kill(self.handle), "deleting")
            return True, f"; deleted {self.what} so that nothing runs without an owner"
        except Exception as exc:   # noqa: BLE001 - reported in the event; execute_complete tries once more
            self.log.exception("deleting %s failed", self.what)
            return False, f"; deleting {self.what} failed too ({type(exc).__name__}: {exc})"

    async def run(self) -> AsyncIterator[TriggerEvent]:
        interval = self.backend.settings.poll_interval_s
        self.log.info("waiting for %s (submitted %.0fs ago)", self.what, time.time() - self.started_at)
        last = None
        while True:
            if self.deadline is not None and time.time() >= self.deadline:
                limit = timedelta(seconds=round(self.deadline - self.started_at, 1))
                yield self._event("failed", "Timeout", f"{self.what} still running after the task's "
                                                       f"execution_timeout ({limit}); it is stopped")
                return
            try:
                status = await self._retrying(lambda: self.backend.poll(self.handle), "polling")
            except Exception as exc:   # noqa: BLE001 - the task fails; the job must not outlive its owner
                self.log.exception("polling %s failed; deleting it", self.what)
                deleted, note = await self._delete()
                yield self._event("error", type(exc).__name__, f"{exc}{note}", deleted=deleted)
                return
            if status["status"] != "running":
                yield self._event(status["status"], status["reason"], status["message"])
                return
            if status["reason"] != last:   # trigger logs reach the task log: show progress, not every poll
                self.log.info("%s: %s", self.what, status["reason"])
                last = status["reason"]
            wait = interval if self.deadline is None else max(0.0, min(interval, self.deadline - time.time()))
            await asyncio.sleep(wait)

    async def on_kill(self) -> None:
        """Airflow >= 3.3 calls this only when a user kills the deferred task (not on triggerer restarts)."""
        self.log.info("task killed: deleting %s", self.what)
        await self._retrying(lambda: self.backend.kill(self.handle), "deleting")
