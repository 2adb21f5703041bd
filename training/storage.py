"""Where stage outputs live. Everything is a URI: a local path, `file://…` or `s3://bucket/prefix` (DESIGN rule 4).

Stages always read and write local files. For an `s3://` run root the local side is a *mirror* under
`$SEEKFLOW_SCRATCH` (default `<tmp>/seekflow-scratch`): `fetch(uri)` downloads what a stage needs into the mirror and
`publish(path)` uploads what it wrote. Local run roots need neither: both are no-ops, so laptops pay nothing.

Object-store settings come from the environment, as boto3 reads them: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL_S3` for an S3-compatible server (SeaweedFS, MinIO); MLflow's
`MLFLOW_S3_ENDPOINT_URL` is honoured too so one Secret serves both.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

SCRATCH_ENV = "SEEKFLOW_SCRATCH"


class StorageError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------ URIs --
def is_remote(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme == "s3"


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/run", "curate", "manifest.json")` → "s3://b/run/curate/manifest.json" (local paths likewise)."""
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local_dir(uri, create=False), *parts))


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri!r}: an s3 URI needs a bucket (s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "seekflow-scratch")


def local_dir(uri: str | Path, create: bool = True) -> Path:
    """The local directory behind a URI: the path itself, or the mirror of an s3 prefix."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        bucket, key = _bucket_key(uri)
        path = scratch_root() / "s3" / bucket / key
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
    else:
        raise StorageError(f"{uri!r}: scheme {parsed.scheme!r} is not supported; use a local path, file:// or s3://")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def stage_uri(run_root: str, stage: str) -> str:
    return join(run_root, stage)


def stage_dir(run_root: str, stage: str) -> Path:
    """The local directory a stage writes into (publish() copies it to the run root when that is remote)."""
    path = local_dir(run_root) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def uri_of(path: Path, run_root: str) -> str:
    """The URI of a local file or directory under `run_root`'s local directory (itself, for a local run root)."""
    if not is_remote(run_root):
        return str(path)
    relative = Path(path).resolve().relative_to(local_dir(run_root))
    return join(run_root, relative.as_posix())


def _mirror_uri(path: Path) -> str | None:
    """The s3 URI a path inside the scratch mirror stands for (None for a path outside it)."""
    try:
        relative = Path(path).resolve().relative_to((scratch_root() / "s3").resolve())
    except ValueError:
        return None
    bucket, *key = relative.parts
    return "s3://" + "/".join([bucket, *key])


# ---------------------------------------------------------------------------------------------------- S3 I/O --
@lru_cache(maxsize=1)
def _client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    # Standard retry mode backs off on throttling and 5xx; connect timeouts keep an unreachable endpoint from hanging.
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _s3_error(uri: str, err: Exception) -> StorageError:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", type(err).__name__)
    return StorageError(f"{uri}: {code}: {err}")


def _list(uri: str) -> list[tuple[str, int]]:
    """(key, size) of every object under the prefix `uri`/ (the object `uri` itself included)."""
    bucket, key = _bucket_key(uri)
    found = []
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"] == key or obj["Key"].startswith(key.rstrip("/") + "/"):
                    found.append((obj["Key"], obj["Size"]))
    except Exception as err:   # botocore raises ClientError, EndpointConnectionError, NoCredentialsError, ...
        raise _s3_error(uri, err) from err
    return found


def children(uri: str) -> list[str]:
    """Names of the entries directly under a directory or prefix, sorted."""
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    _, key = _bucket_key(uri)
    base = key.rstrip("/") + "/"
    return sorted({k[len(base):].split("/", 1)[0] for k, _ in _list(uri) if k.startswith(base)})


def list_files(uri: str) -> list[tuple[str, int]]:
    """(URI, size) of every file at or under `uri` (a file, directory or prefix), recursively, sorted by URI: the
    deterministic input order of curation sources. Hidden files and in-progress downloads are left out."""
    if is_remote(uri):
        bucket, _ = _bucket_key(uri)
        return sorted((f"s3://{bucket}/{key}", size) for key, size in _list(uri) if not key.endswith("/"))
    path = local_dir(uri, create=False)
    if path.is_file():
        return [(str(path), path.stat().st_size)]
    if not path.is_dir():
        raise StorageError(f"{uri}: no such file or directory")
    return [(str(p), p.stat().st_size) for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return local_dir(uri, create=False).exists()
    return bool(_list(uri))


def read_text(uri: str) -> str | None:
    """A small object's text, or None when it does not exist."""
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        return path.read_text() if path.is_file() else None
    bucket, key = _bucket_key(uri)
    try:
        return _client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except Exception as err:
        if getattr(err, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _s3_error(uri, err) from err


def write_text(uri: str, text: str) -> None:
    """Write a small object in one PUT (atomic on S3: readers see the old or the new object, never half)."""
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    bucket, key = _bucket_key(uri)
    try:
        _client().put_object(Bucket=bucket, Key=key, Body=text.encode())
    except Exception as err:
        raise _s3_error(uri, err) from err


def fetch(uri: str) -> Path:
    """Make `uri` (an object or a prefix) available locally and return its local path.

    Files already in the mirror with the same size are not downloaded again; each download goes to a temporary name
    first, so an interrupted fetch never leaves a truncated file under the real name.
    """
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        if not path.exists():
            raise StorageError(f"{uri}: no such file or directory")
        return path
    objects = _list(uri)
    if not objects:
        raise StorageError(f"{uri}: no such object or prefix")
    bucket, key = _bucket_key(uri)
    for obj_key, size in objects:
        target = scratch_root() / "s3" / bucket / obj_key
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            _client().download_file(bucket, obj_key, str(tmp))
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise _s3_error(f"s3://{bucket}/{obj_key}", err) from err
        os.replace(tmp, target)
    return local_dir(uri, create=False)


def publish(path: Path, *, exclude: tuple[str, ...] = ()) -> str | None:
    """Upload a local file or directory tree of the s3 mirror to its URI; returns the URI (None for local paths).

    `exclude` names top-level entries of a directory to skip (e.g. a manifest that must be uploaded last).
    """
    uri = _mirror_uri(path)
    if uri is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in exclude
        and not p.name.endswith((".tmp", ".part")))
    bucket, _ = _bucket_key(uri)
    mirror = (scratch_root() / "s3" / bucket).resolve()
    for file in files:
        key = file.resolve().relative_to(mirror).as_posix()
        try:
            _client().upload_file(str(file), bucket, key)
        except Exception as err:
            raise _s3_error(f"s3://{bucket}/{key}", err) from err
    return uri


def delete(uri: str) -> None:
    """Remove an object or every object under a prefix (remote only; local callers remove files themselves)."""
    if not is_remote(uri):
        return
    bucket, _ = _bucket_key(uri)
    keys = [key for key, _ in _list(uri)]
    for i in range(0, len(keys), 1000):
        try:
            _client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        except Exception as err:
            raise _s3_error(uri, err) from err


# ------------------------------------------------------------------------------------------------ local files --
def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temp file and rename, so a reader never sees half a file (rename is atomic on POSIX)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
