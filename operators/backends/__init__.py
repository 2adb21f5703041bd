"""Compute backends behind TrainingJobOperator. `local` is the embedded default."""
from __future__ import annotations

from operators.backends.base import Backend, JobFailed, JobSpec

BACKENDS = ("local", "kubernetes")


def get_backend(name: str, settings=None) -> Backend:
    """`settings`: KubernetesSettings for the kubernetes backend (default: `KubernetesSettings.from_env()`)."""
    if name == "local":
        from operators.backends.local import LocalBackend

        return LocalBackend()
    if name == "kubernetes":   # imported lazily: the kubernetes client is not needed at DAG parse time
        from operators.backends.k8s_settings import KubernetesSettings
        from operators.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings or KubernetesSettings.from_env())
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "JobFailed", "JobSpec", "get_backend"]
