"""The MLflow model registry, and every way a stage names a checkpoint, resolved to a local release directory.

A checkpoint reference is one of
    a release directory      a local path or file:// URI, used in place
    an s3:// URI             mirrored into the scratch directory (training.storage)
    a registered version     `models:/<name>/<version>` or `models:/<name>@<alias>`: resolved to a fixed version
                             number first (an alias can move), then the release directory `register` logged under
                             `checkpoint/` is downloaded once
and `resolve_release` turns any of them into a complete local directory whose every file matches the sha256 its
complete.json records (training/integrity.py), before anything unpickles it. A registered version also carries the
sha256 of that complete.json as its `seekflow.release_sha256` tag (set by register): a download must match it, so
rewriting both the artifacts and their marker in the artifact store is not enough to plant a checkpoint; a version
without the tag is refused. Evaluate, register, promote and pretrain's `init_checkpoint` all go through this module;
every failure here is a `RegistryError` naming the file, raised before the stage writes anything. Writes to the
registry are version tags only (`tag_version`); aliases belong to register and promote.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from training import integrity, storage

MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")
EVAL_TAG = "seekflow.eval."   # evaluation results on a version: seekflow.eval.<suite>.<metric>
RELEASE_SHA256_TAG = "seekflow.release_sha256"   # sha256 of the registered release's complete.json


class RegistryError(RuntimeError):
    """A checkpoint reference, the tracking server or the registry failed a check: nothing was written.

    `permanent` (the default): the reference itself is bad (no such model, version or alias; torn or tampered
    bytes), so the job reports bad input and the task is not retried; an unreachable server or a failed download
    is transient and is retried."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    source: str        # the artifact URI the version points at
    run_id: str | None
    release_sha256: str | None = None   # its RELEASE_SHA256_TAG: what a download of `source` must match

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class LocalRelease:
    path: Path                       # a complete release directory on this machine
    version: ModelVersion | None     # the registered version it came from, if any


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


@lru_cache(maxsize=8)
def mlflow_client(uri: str):
    """The one MlflowClient per tracking URI, for tracking and registry alike."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def unreachable_reason(uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an http(s) tracking server fails its health check, or None when it answers (or the store is not HTTP)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_tracking_server(uri: str, timeout_s: float = 5.0, *, require_registry: bool = False) -> None:
    """Fail fast when an http(s) tracking server does not answer (MLflow's own client retries for minutes). With
    `require_registry`, a sqlite store must already exist: reading a registry must not create an empty one."""
    if require_registry and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise RegistryError(f"no MLflow registry at {uri} (the file does not exist)")
    problem = unreachable_reason(uri, timeout_s)
    if problem is not None:
        raise RegistryError(f"MLflow tracking server {uri} is unreachable ({problem})", permanent=False)


def resolve_version(client, ref: str) -> ModelVersion:
    """The fixed version behind `models:/name/version` or `models:/name@alias`, or a clear error."""
    from mlflow.exceptions import MlflowException

    match = MODELS_URI.fullmatch(ref)
    if not match:
        raise RegistryError(f"{ref!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    name = match["name"]
    try:
        if match["alias"]:
            mv = client.get_model_version_by_alias(name, match["alias"])
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as err:
        raise RegistryError(f"{ref}: no such registered model version ({err.message})") from None
    return ModelVersion(name=mv.name, version=str(mv.version), source=mv.source, run_id=mv.run_id,
                        release_sha256=(mv.tags or {}).get(RELEASE_SHA256_TAG))


def registered_version(client, name: str, ref: str) -> tuple[dict[str, str], str]:
    """(the model's aliases -> version, the version number `ref` names): `ref` is a number or an alias
    (`@alias` or `alias`). Unknown models, versions and aliases are errors naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        raise RegistryError(f"no registered model {name!r} ({err.error_code})") from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions; run the register stage first")
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    if not ref.isdigit():
        alias = ref.removeprefix("@")
        if alias not in aliases:
            listing = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{name} has no alias {alias!r} (aliases: {listing})")
        return aliases, aliases[alias]
    if ref not in versions:
        raise RegistryError(f"{name} has no version {ref} (versions: {', '.join(versions)})")
    return aliases, ref


def release_tags(release: Path) -> dict[str, str]:
    """The tags that pin a release's bytes on the version registering it (verified against its marker first)."""
    integrity.verify_tree(release)
    return {RELEASE_SHA256_TAG: integrity.marker_digest(release)}


def _pinned_digest(version: ModelVersion) -> str:
    if not version.release_sha256:
        raise integrity.IntegrityError(
            f"{version.uri} carries no {RELEASE_SHA256_TAG} tag (registered before releases were hash-verified, or "
            f"not by the register stage): its artifacts cannot be verified; register the release again")
    return version.release_sha256


def verify_download(version: ModelVersion, path: Path) -> None:
    """Refuse a downloaded release (IntegrityError naming the file) unless its complete.json is the one the version's
    tag pins and every file matches it."""
    digest = integrity.marker_digest(path)
    if digest != _pinned_digest(version):
        raise integrity.IntegrityError(
            f"{path / integrity.MARKER}: sha256 {digest[:16]}… differs from {version.release_sha256[:16]}… that "
            f"{version.uri} records ({RELEASE_SHA256_TAG}): the artifacts changed after registration; refusing them")
    integrity.verify_tree(path)


def download_release(version: ModelVersion, into: Path) -> Path:
    """The version's release directory under `into`, downloaded once and verified against the version's
    `seekflow.release_sha256` tag (on every call: a copy already there that no longer verifies is downloaded again;
    a partial download never appears under the final name, a refused one is removed). IntegrityError naming the file
    on a mismatch. mlflow-artifacts:/ sources resolve through the current tracking URI (`mlflow.set_tracking_uri`)."""
    import mlflow

    _pinned_digest(version)   # no tag, nothing to verify against: refused before downloading
    final = into / f"{version.name}-v{version.version}"
    if final.is_dir():
        try:
            verify_download(version, final)
            return final
        except integrity.IntegrityError:
            shutil.rmtree(final)   # a stale or altered copy: fetch the registered bytes again
    partial = into / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(partial)))
    except Exception as err:   # noqa: BLE001 - any transport error is a bad input here
        shutil.rmtree(partial, ignore_errors=True)
        raise RegistryError(f"{version.uri}: could not download its artifacts from {version.source}: {err}",
                            permanent=False) from None
    os.replace(local, final)      # rename: the directory appears only once it is complete
    shutil.rmtree(partial, ignore_errors=True)
    try:
        verify_download(version, final)   # (a copy left here unverified is verified by the next call, as above)
    except integrity.IntegrityError:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final


def resolve_release(ref: str, *, tracking_uri: str, into: Path, version: ModelVersion | None = None) -> LocalRelease:
    """The complete, verified local release directory `ref` names (see the module docstring). Registered versions
    are downloaded under `into`; pass `version` when it is already resolved (the registry is not asked again)."""
    from training.model.release import ReleaseError, verify_release

    if version is None and is_registry_ref(ref):
        version = resolve_version(mlflow_client(tracking_uri), ref)
    try:
        if version is not None:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)   # download_artifacts resolves mlflow-artifacts:/ through it
            path = download_release(version, into)
        else:
            path = storage.fetch(ref) if storage.is_remote(ref) else storage.local_dir(ref, create=False)
        return LocalRelease(verify_release(path), version)
    except (ReleaseError, storage.StorageError, integrity.IntegrityError) as err:
        # An unsafe key or bad bytes are bad input; any other storage error (a network failure) is transient.
        transient = isinstance(err, storage.StorageError) and not isinstance(err, storage.UnsafeKeyError)
        raise RegistryError(str(err), permanent=not transient) from None


def resolve_release_on_every_rank(ref: str, *, tracking_uri: str, into: Path) -> Path:
    """`resolve_release` for a distributed job, called by every rank. Rank 0 alone asks the registry which version
    `ref` names (one answer for the whole job, even if the alias moves meanwhile); each node's local rank 0
    downloads it (the ranks of a node share its disk); every rank gets the path, or every rank raises the error."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return resolve_release(ref, tracking_uri=tracking_uri, into=into).path
    pinned: list = [None]
    if dist.get_rank() == 0 and is_registry_ref(ref):
        try:
            pinned = [resolve_version(mlflow_client(tracking_uri), ref)]
        except RegistryError as err:
            pinned = [err]
    dist.broadcast_object_list(pinned, src=0)
    answers: list = [None] * dist.get_world_size()
    answer = None
    if isinstance(pinned[0], RegistryError):
        answer = pinned[0]
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            answer = str(resolve_release(ref, tracking_uri=tracking_uri, into=into, version=pinned[0]).path)
        except RegistryError as err:
            answer = err
    dist.all_gather_object(answers, answer)   # also the barrier: every node's download is complete
    for item in answers:
        if isinstance(item, RegistryError):
            raise RegistryError(str(item), permanent=item.permanent)
    return Path(answers[0])


def directory_fingerprint(path: Path) -> str:
    """Cheap identity of a local release directory: file names, sizes and modification times (no hashing of
    multi-GB weights). A retrained checkpoint written over the same path changes it."""
    import hashlib

    rows = sorted(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def eval_tags(metrics: dict[str, float], extra: dict[str, str] | None = None) -> dict[str, str]:
    """`seekflow.eval.<suite>.<metric>` tags (numbers as `%.6g` text, which promote's gate parses back)."""
    tags = {EVAL_TAG + key: f"{value:.6g}" for key, value in metrics.items()}
    tags.update({EVAL_TAG + key: value for key, value in (extra or {}).items()})
    return tags


def tag_version(client, name: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on one registered version (each tag is its own registry call)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
