"""Where stage outputs live. Run roots are URIs; this skeleton resolves local paths and `file://` URIs.

Every stage goes through `local_dir()` so that adding an object-store backend (s3:// via boto3) changes this module
only. Until then an `s3://` run root fails up front with a clear message instead of writing somewhere unexpected.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import urlparse


class StorageError(RuntimeError):
    pass


def local_dir(uri: str) -> Path:
    """The local directory behind a run-root URI (created if missing)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    raise StorageError(f"run_root {uri!r}: scheme {parsed.scheme!r} is not supported yet; use a local path or file://")


def stage_dir(run_root: str, stage: str) -> Path:
    path = local_dir(run_root) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


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
