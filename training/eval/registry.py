"""Where the evaluated model comes from, and where its results go in the MLflow registry.

A checkpoint reference is a release directory (local path or s3:// URI) or a registered version,
`models:/<name>/<version>` or `models:/<name>@<alias>`. Registry references are resolved to a fixed version
number first (an alias can move), then the version's artifacts — the release directory `register` logged under
`checkpoint/` — are downloaded once into the evaluate stage directory.
Every lookup here is read-only; `tag_version` is the only write and runs after evaluation succeeded.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")


class EvaluateError(RuntimeError):
    """Bad input to the evaluate stage, found before any work (nothing written, nothing tagged)."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    source: str        # the artifact URI the version points at
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not answer (MLflow's own client retries for minutes)."""
    from training.tracking import unreachable_reason

    problem = unreachable_reason(uri, timeout_s)
    if problem is not None:
        raise EvaluateError(f"MLflow tracking server {uri} is unreachable ({problem}); nothing was evaluated")


def resolve_version(client, ref: str) -> ModelVersion:
    """The fixed version behind `models:/name/version` or `models:/name@alias`, or a clear error."""
    from mlflow.exceptions import MlflowException

    match = _MODELS_URI.fullmatch(ref)
    if not match:
        raise EvaluateError(f"{ref!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    name = match["name"]
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as err:
        raise EvaluateError(f"{ref}: no such registered model version ({err.message})") from None
    return ModelVersion(name=mv.name, version=str(mv.version), source=mv.source, run_id=mv.run_id)


def download_release(version: ModelVersion, into: Path) -> Path:
    """The version's release directory under `into`, downloaded once (a partial download is never reused)."""
    import mlflow

    final = into / f"{version.name}-v{version.version}"
    if (final / "metadata.json").is_file():
        return final
    partial = into / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(partial)))
    except Exception as err:   # noqa: BLE001 - any transport error is a bad input here
        shutil.rmtree(partial, ignore_errors=True)
        raise EvaluateError(f"{version.uri}: could not download its artifacts from {version.source}: {err}") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(local, final)      # rename: the directory appears only once it is complete
    shutil.rmtree(partial, ignore_errors=True)
    return final


def directory_fingerprint(path: Path) -> str:
    """Cheap identity of a local release directory: file names, sizes and modification times (no hashing of
    multi-GB weights). A retrained checkpoint written over the same path changes it."""
    import hashlib

    rows = sorted(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def tag_version(client, version: ModelVersion, metrics: dict[str, float], extra: dict[str, str]) -> None:
    """`seekflow.eval.<suite>.<metric>` tags on the model version, so the registry shows how it scored."""
    for key, value in metrics.items():
        client.set_model_version_tag(version.name, version.version, f"seekflow.eval.{key}", f"{value:.6g}")
    for key, value in extra.items():
        client.set_model_version_tag(version.name, version.version, f"seekflow.eval.{key}", value)
