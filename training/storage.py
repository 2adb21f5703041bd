"""Where stage outputs live. Everything is a URI: a local path, `file://…` or `s3://bucket/prefix` (DESIGN rule 4).

Stages always read and write local files. For an `s3://` run root the local side is a *mirror* under
`$SEEKFLOW_SCRATCH` (default `<tmp>/seekflow-scratch`): `fetch(uri)` downloads what a stage needs into the mirror and
`publish(path)` uploads what it wrote. Local run roots need neither: both are no-ops, so laptops pay nothing.

Object-store settings come from the environment, as boto3 reads them: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL_S3` for an S3-compatible server (SeaweedFS, MinIO); MLflow's
`MLFLOW_S3_ENDPOINT_URL` is honoured too so one Secret serves both.

Keys are untrusted: one that would not map to a file inside the mirror (a `.`/`..`/empty segment, a leading `/`) is
refused with `UnsafeKeyError` before anything is written. Uploads record the file's sha256 in the object's user
metadata; `fetch` keeps a mirrored file only when its content matches (sha256, else a plain-MD5 ETag).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

SCRATCH_ENV = "SEEKFLOW_SCRATCH"


class StorageError(RuntimeError):
    pass


class UnsafeKeyError(StorageError):
    """An object key or URI that would resolve outside the scratch mirror (or alias another key there)."""


# S3 bucket names (plus legacy uppercase/underscore ones); never "." or "..", which would climb out of the mirror.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")     # a single-part PUT's ETag; multipart ETags end in "-<parts>"
SHA256_METADATA = "sha256"                   # user metadata (x-amz-meta-sha256) that publish/write_text record


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
    if not _BUCKET.fullmatch(parsed.netloc):
        raise UnsafeKeyError(f"{uri!r}: {parsed.netloc!r} is not a bucket name")
    key = parsed.path.lstrip("/")
    if key:
        check_key(key, uri)
    return parsed.netloc, key


def check_key(key: str, uri: str) -> str:
    """Refuse a key that would not map to its own file inside the mirror: `..` climbs out of it, a leading `/` makes
    the joined path absolute, and `.` or empty segments make two keys share one file. A trailing `/` (a directory
    marker) is allowed. S3 stores all of these verbatim; the mirror cannot."""
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    if key.startswith("/") or "\0" in key or any(s in ("", ".", "..") for s in segments):
        raise UnsafeKeyError(f"refusing object key {key!r} under {uri}: a leading '/' or a '.', '..' or empty path "
                             "segment would resolve outside the scratch mirror or alias another key")
    return key


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


def _mirror_path(bucket: str, key: str, uri: str) -> Path:
    """The mirror file of `bucket/key`, checked lexically and again after symlinks in the scratch tree resolve."""
    root = scratch_root() / "s3" / bucket
    target = root / check_key(key, uri)
    if not Path(os.path.realpath(target)).is_relative_to(os.path.realpath(root)):
        raise UnsafeKeyError(f"refusing object key {key!r} under {uri}: {target} resolves outside the mirror {root}")
    return target


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


def _objects(uri: str, *, check: bool = True) -> list[dict]:
    """The listing entries ({Key, Size, ETag, ...}) of every object under the prefix `uri`/ (the object `uri` itself
    included). Every key is checked (`check_key`) unless `check` is False: only `delete` builds no path from them."""
    bucket, key = _bucket_key(uri)
    found = []
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for obj in page.get("Contents", []):
                if not key or obj["Key"] == key or obj["Key"].startswith(key.rstrip("/") + "/"):
                    found.append(obj)   # (a bucket-root URI, key "", holds every object)
    except Exception as err:   # botocore raises ClientError, EndpointConnectionError, NoCredentialsError, ...
        raise _s3_error(uri, err) from err
    if check:   # all of them before any caller acts on one: a refused listing writes nothing
        for obj in found:
            check_key(obj["Key"], uri)
    return found


def _list(uri: str) -> list[tuple[str, int]]:
    """(key, size) of every object under the prefix `uri`/ (the object `uri` itself included)."""
    return [(obj["Key"], obj["Size"]) for obj in _objects(uri)]


def children(uri: str) -> list[str]:
    """Names of the entries directly under a directory or prefix, sorted."""
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    _, key = _bucket_key(uri)
    base = key.rstrip("/") + "/" if key else ""
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
        body = text.encode()
        _client().put_object(Bucket=bucket, Key=key, Body=body,
                             Metadata={SHA256_METADATA: hashlib.sha256(body).hexdigest()})
    except Exception as err:
        raise _s3_error(uri, err) from err


def fetch(uri: str) -> Path:
    """Make `uri` (an object or a prefix) available locally and return its local path.

    A file already in the mirror is kept only when its content is the object's (`_is_current`); each download goes
    to a temporary name first, so an interrupted fetch never leaves a truncated file under the real name. Every key
    is checked before the first download: a listing with an unsafe key writes nothing.
    """
    if not is_remote(uri):
        path = local_dir(uri, create=False)
        if not path.exists():
            raise StorageError(f"{uri}: no such file or directory")
        return path
    objects = _objects(uri)
    if not objects:
        raise StorageError(f"{uri}: no such object or prefix")
    bucket, _ = _bucket_key(uri)
    # Directory markers ("dir/", made by consoles and some tools) hold no file.
    planned = [(obj, _mirror_path(bucket, obj["Key"], uri)) for obj in objects if not obj["Key"].endswith("/")]
    for obj, target in planned:
        obj_uri = f"s3://{bucket}/{obj['Key']}"
        if _is_current(bucket, obj, target, obj_uri):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            _client().download_file(bucket, obj["Key"], str(tmp))
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise _s3_error(obj_uri, err) from err
        os.replace(tmp, target)
    return local_dir(uri, create=False)


def _is_current(bucket: str, obj: dict, target: Path, obj_uri: str) -> bool:
    """Whether the mirror file holds the object's bytes. Sizes first (free); only a same-size file costs a HEAD and
    one hashing pass: against the sha256 our uploads record, else against an ETag that is a plain MD5 (a single-part
    upload by another tool). A multipart ETag without metadata says nothing about the bytes: download again."""
    if not target.is_file() or target.stat().st_size != obj["Size"]:
        return False
    try:
        head = _client().head_object(Bucket=bucket, Key=obj["Key"])
    except Exception as err:
        raise _s3_error(obj_uri, err) from err
    if head.get("ContentLength", obj["Size"]) != obj["Size"]:   # rewritten since the listing
        return False
    if want := head.get("Metadata", {}).get(SHA256_METADATA):
        return _file_digest(target, "sha256") == want.lower()
    etag = head.get("ETag", obj.get("ETag", "")).strip('"').lower()
    return bool(_PLAIN_MD5.fullmatch(etag)) and _file_digest(target, "md5") == etag


def publish(path: Path, *, exclude: tuple[str, ...] = ()) -> str | None:
    """Upload a local file or directory tree of the s3 mirror to its URI; returns the URI (None for local paths).

    `exclude` names top-level entries of a directory to skip (e.g. a manifest that must be uploaded last).
    """
    uri = _mirror_uri(path)
    if uri is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and p.relative_to(path).parts[0] not in exclude
        and not p.name.endswith((".tmp", ".part")))
    bucket, base = _bucket_key(uri)
    for file in files:
        # A symlink would upload bytes from outside the stage directory (a secret, /proc/...): refused.
        if file.is_symlink():
            raise UnsafeKeyError(f"refusing to upload {file}: a symlink (to {os.readlink(file)})")
        # Keys are built lexically from the path under the mirror, never from a resolved path.
        relative = file.relative_to(path).as_posix() if file != path else ""
        key = check_key("/".join(p for p in (base, relative) if p), uri)
        try:
            _client().upload_file(str(file), bucket, key,
                                  ExtraArgs={"Metadata": {SHA256_METADATA: _file_digest(file, "sha256")}})
        except Exception as err:
            raise _s3_error(f"s3://{bucket}/{key}", err) from err
    return uri


def delete(uri: str) -> None:
    """Remove an object or every object under a prefix (remote only; local callers remove files themselves).

    Each key is deleted on condition of the ETag it was listed with (S3 conditional delete), so an object another
    writer replaced meanwhile is kept and reported, not lost. Per-key errors raise `StorageError` naming every key
    and its S3 error code; NoSuchKey (already gone, e.g. a concurrent prune) is what was wanted and passes.
    """
    if not is_remote(uri):
        return
    bucket, _ = _bucket_key(uri)
    objects = _objects(uri, check=False)   # keys only go back to S3 here: a planted "../" key can still be removed
    failed = []
    for i in range(0, len(objects), 1000):   # DeleteObjects takes at most 1000 keys
        batch = [{"Key": o["Key"], **({"ETag": o["ETag"]} if o.get("ETag") else {})} for o in objects[i:i + 1000]]
        try:
            response = _client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception as err:
            raise _s3_error(uri, err) from err
        failed += [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
    if failed:
        shown = "; ".join(f"{e.get('Key')!r}: {e.get('Code')} ({e.get('Message', '')})" for e in failed[:20])
        more = f"; and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise StorageError(f"{uri}: {len(failed)} of {len(objects)} objects were not deleted: {shown}{more}")


# ------------------------------------------------------------------------------------------------ local files --
def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temp file and rename, so a reader never sees half a file (rename is atomic on POSIX)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    return _file_digest(path, "sha256", chunk)


def _file_digest(path: Path, algorithm: str, chunk: int = 1 << 20) -> str:
    """Hash in 1 MiB blocks: a multi-GB checkpoint shard never sits in memory whole. MD5 only ever matches an ETag
    (usedforsecurity=False keeps it available on FIPS builds)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
