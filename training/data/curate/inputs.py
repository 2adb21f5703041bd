"""Fingerprints of a curate run's inputs, for the manifest: a rerun with the same fingerprints is skipped.

Package sources: the installed distributions' `name==version` list. URI sources: every input file with its size and
sha256 (local files) or its size (s3 objects, which are not downloaded just to be hashed), plus a digest over them.
"""
from __future__ import annotations

import hashlib
import json

from training import storage
from training.config.curate import PACKAGE_KINDS
from training.data import sample_corpus


def fingerprints(sources) -> dict:
    from training.data.curate.readers import installed_packages

    fingerprints = {}
    for source in sources:
        if source.kind in PACKAGE_KINDS:
            fingerprints[source.label] = sample_corpus.fingerprint(installed_packages())
        else:
            fingerprints[source.label] = uri_fingerprint(source.uri)
    return fingerprints


def uri_fingerprint(uri: str) -> dict:
    try:
        files = storage.list_files(uri)
    except storage.StorageError as err:
        raise storage.StorageError(f"curate source {uri}: cannot list its files: {err}") from err
    listed = [{"uri": u, "bytes": size,
               **({} if storage.is_remote(u) else {"sha256": storage.sha256_file(storage.local_dir(u, create=False))})}
              for u, size in files]
    digest = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    return {"uri": uri, "files": len(listed), "bytes": sum(f["bytes"] for f in listed), "sha256": digest,
            "listing": listed[:1000]}   # the first 1000 files by name; the digest covers all of them
