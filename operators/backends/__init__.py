"""Compute backends behind TrainingJobOperator. `local` is the embedded default."""
from __future__ import annotations

from operators.backends.base import Backend, JobFailed, JobSpec

BACKENDS = ("local",)   # the Kubernetes backend (JobSet / Indexed Job) plugs in here


def get_backend(name: str) -> Backend:
    if name == "local":
        from operators.backends.local import LocalBackend

        return LocalBackend()
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "JobFailed", "JobSpec", "get_backend"]
