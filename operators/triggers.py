"""JobCompletionTrigger: waits in the triggerer for a Kubernetes job to finish, so no worker slot is held meanwhile.

It is persisted as (classpath, kwargs) and may be re-created on another triggerer at any time, so it keeps no state
of its own: each poll asks the API (the Pending clock is the pods' creation time, not the trigger's). The sync
client runs in a thread (`asyncio.to_thread`), reusing `KubernetesBackend.poll` — one status logic for both paths.
"""
from __future__ import annotations

import asyncio
import time
from functools import cached_property
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent


class JobCompletionTrigger(BaseTrigger):
    def __init__(self, *, name: str, namespace: str, kind: str, settings: dict[str, Any], started_at: float):
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.kind = kind
        self.settings = settings          # KubernetesSettings as JSON (it holds no secrets: only a Secret's name)
        self.started_at = started_at      # when the task submitted (epoch seconds; shown in the log)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"name": self.name, "namespace": self.namespace, "kind": self.kind, "settings": self.settings,
                 "started_at": self.started_at})

    @cached_property
    def backend(self):
        from operators.backends.k8s_settings import KubernetesSettings
        from operators.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(KubernetesSettings.model_validate(self.settings))

    @property
    def handle(self):
        from operators.backends.kubernetes import JobHandle

        return JobHandle(self.name, self.namespace, self.kind)

    def _event(self, status: str, reason: str, message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "reason": reason, "message": message, "name": self.name,
                             "namespace": self.namespace, "kind": self.kind})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        interval = self.backend.settings.poll_interval_s
        self.log.info("waiting for %s %s/%s (submitted %.0fs ago)", self.kind, self.namespace, self.name,
                      time.time() - self.started_at)
        last = None
        while True:
            try:
                status = await asyncio.to_thread(self.backend.poll, self.handle)
            except Exception as exc:   # noqa: BLE001 - hand it to the task, which fails (and a retry reattaches)
                self.log.exception("polling %s %s/%s failed", self.kind, self.namespace, self.name)
                yield self._event("error", type(exc).__name__, str(exc))
                return
            if status["status"] != "running":
                yield self._event(status["status"], status["reason"], status["message"])
                return
            if status["reason"] != last:   # trigger logs reach the task log: show progress, not every poll
                self.log.info("%s %s/%s: %s", self.kind, self.namespace, self.name, status["reason"])
                last = status["reason"]
            await asyncio.sleep(interval)

    async def on_kill(self) -> None:
        """Airflow >= 3.3 calls this only when a user kills the deferred task (not on triggerer restarts)."""
        self.log.info("task killed: deleting %s %s/%s", self.kind, self.namespace, self.name)
        await asyncio.to_thread(self.backend.kill, self.handle)
