"""training/storage.py against a real S3-compatible server (SeaweedFS): keys that would leave the scratch mirror are
refused before anything is written, `delete` reports per-key errors, and `fetch` decides by content, not size."""
from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter

import pytest

from training import storage

MiB = 1 << 20


@pytest.fixture
def calls(s3_env):
    """How many requests of each operation storage's own client sent (GetObject, HeadObject, ...)."""
    counts = Counter()
    storage._client().meta.events.register("before-call.s3", lambda model, **_: counts.update([model.name]))
    return counts


def _add_to_listings(extra_keys):
    """Append keys to every ListObjectsV2 answer storage's client gets from the server; returns the handler."""
    def add(parsed, **_):
        parsed.setdefault("Contents", []).extend({"Key": k, "Size": 1, "ETag": '"0"'} for k in extra_keys)
    storage._client().meta.events.register("after-call.s3.ListObjectsV2", add)
    return add


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_unsafe_keys_are_refused_before_anything_is_written(s3_env, calls, tmp_path):
    """AWS S3 stores `run/../../x` and `/x` verbatim; joined onto the mirror they land outside it. SeaweedFS itself
    refuses such keys (PutObject answers InvalidRequest for any `.`/`..` segment, even percent-encoded) and strips
    a leading or doubled '/', so they cannot be planted on it: the keys are added to its real listing answers
    instead, as an S3 that stored them would list them."""
    client, bucket = s3_env["client"], f"keys-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="run/ok.bin", Body=b"fine")
    scratch = tmp_path / "scratch"
    added = _add_to_listings(["run/../../../../escaped.txt"])
    with pytest.raises(storage.UnsafeKeyError, match=rf"'run/(\.\./){{4}}escaped\.txt' under s3://{bucket}/run:"):
        storage.fetch(f"s3://{bucket}/run")
    for listing in (storage.children, storage.list_files, storage.exists):   # they hand out names built from keys
        with pytest.raises(storage.UnsafeKeyError, match="escaped"):
            listing(f"s3://{bucket}/run")
    storage._client().meta.events.unregister("after-call.s3.ListObjectsV2", added)

    _add_to_listings(["/tmp/escaped-abs.txt"])          # under a bucket-root URI it would join as an absolute path
    with pytest.raises(storage.UnsafeKeyError, match=rf"'/tmp/escaped-abs\.txt' under s3://{bucket}:"):
        storage.fetch(f"s3://{bucket}")
    assert calls["GetObject"] == 0 and _files(scratch) == []     # not even the good object was written
    assert not (tmp_path / "escaped.txt").exists() and not os.path.exists("/tmp/escaped-abs.txt")


def test_unsafe_uris_and_symlinks_are_refused(s3_env, calls, tmp_path):
    for uri in ("s3://seekflow-test/run/../../../etc", "s3://seekflow-test/a//b", "s3://seekflow-test/./x"):
        with pytest.raises(storage.UnsafeKeyError, match="refusing object key"):
            storage.fetch(uri)
        with pytest.raises(storage.UnsafeKeyError):
            storage.local_dir(uri)
    with pytest.raises(storage.UnsafeKeyError, match="not a bucket name"):
        storage.local_dir("s3://../x")
    assert sum(calls.values()) == 0                     # refused before any request

    stage = storage.stage_dir(f"s3://{s3_env['bucket']}/unit/{tmp_path.name}", "curate")
    (tmp_path / "secret").write_text("token")
    (stage / "leak").symlink_to(tmp_path / "secret")    # would upload bytes from outside the stage directory
    with pytest.raises(storage.UnsafeKeyError, match="refusing to upload .*leak: a symlink"):
        storage.publish(stage)
    assert calls["PutObject"] == 0 and calls["CreateMultipartUpload"] == 0


def test_fetch_compares_content_not_size(s3_env, calls, tmp_path, monkeypatch):
    root = f"s3://{s3_env['bucket']}/unit/{tmp_path.name}"
    stage = storage.stage_dir(root, "ckpt")
    (stage / "shard.bin").write_bytes(os.urandom(256 * 1024))
    storage.publish(stage)
    storage.write_text(f"{root}/ckpt/latest", "4")
    def recorded(name):
        key = f"unit/{tmp_path.name}/ckpt/{name}"
        return s3_env["client"].head_object(Bucket=s3_env["bucket"], Key=key)["Metadata"]["sha256"]
    assert recorded("shard.bin") == storage.sha256_file(stage / "shard.bin")
    assert recorded("latest") == hashlib.sha256(b"4").hexdigest()

    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "second-pod"))
    local = storage.fetch(f"{root}/ckpt") / "shard.bin"
    assert local.read_bytes() == (stage / "shard.bin").read_bytes() and calls["GetObject"] == 2
    storage.fetch(f"{root}/ckpt")                       # unchanged: a HEAD and a hash each, no download
    assert calls["GetObject"] == 2

    local.write_bytes(bytes(b ^ 0xFF for b in local.read_bytes()))   # same size, different bytes
    storage.fetch(f"{root}/ckpt")
    assert local.read_bytes() == (stage / "shard.bin").read_bytes() and calls["GetObject"] == 3

    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "scratch"))   # the writer replaces it, same size
    (stage / "shard.bin").write_bytes(os.urandom(256 * 1024))
    storage.publish(stage)
    monkeypatch.setenv(storage.SCRATCH_ENV, str(tmp_path / "second-pod"))
    storage.fetch(f"{root}/ckpt")
    assert local.read_bytes() == (stage / "shard.bin").read_bytes() and calls["GetObject"] == 4


def test_fetch_of_objects_other_tools_wrote(s3_env, tmp_path):
    """No sha256 metadata: a single-part object's ETag is the MD5 of its bytes, so it is compared; a multipart ETag
    (MD5 of the part MD5s, '-N') is not a content hash of the file, so such an object is always downloaded again."""
    from boto3.s3.transfer import TransferConfig

    client, bucket, prefix = s3_env["client"], s3_env["bucket"], f"foreign/{tmp_path.name}"
    client.put_object(Bucket=bucket, Key=f"{prefix}/plain.bin", Body=b"p" * 1000)
    (tmp_path / "big").write_bytes(os.urandom(5 * MiB + 1))
    client.upload_file(str(tmp_path / "big"), bucket, f"{prefix}/multi.bin",
                       Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    assert "-" in client.head_object(Bucket=bucket, Key=f"{prefix}/multi.bin")["ETag"]

    gets = Counter()
    storage._client().meta.events.register("before-parameter-build.s3.GetObject",
                                           lambda params, **_: gets.update([params["Key"].rsplit("/", 1)[1]]))
    local = storage.fetch(f"s3://{bucket}/{prefix}")
    assert gets["plain.bin"] == 1 and gets["multi.bin"] >= 1
    storage.fetch(f"s3://{bucket}/{prefix}")
    assert gets["plain.bin"] == 1                       # its MD5 matched: kept
    assert gets["multi.bin"] >= 2                       # nothing to compare with: downloaded again
    assert (local / "multi.bin").read_bytes() == (tmp_path / "big").read_bytes()
    (local / "plain.bin").write_bytes(b"q" * 1000)      # same size, different bytes
    storage.fetch(f"s3://{bucket}/{prefix}")
    assert gets["plain.bin"] == 2 and (local / "plain.bin").read_bytes() == b"p" * 1000


def test_delete_raises_on_per_key_errors(s3_env, tmp_path):
    """A real per-key error from SeaweedFS: `delete` deletes each key on condition of its listed ETag, and another
    writer replaces one object between the listing and the DeleteObjects call, so SeaweedFS answers
    PreconditionFailed for that key inside a 200 response. (It enforces no bucket policy without an IAM config, and
    a plain delete under object lock only adds a delete marker, so neither gives a per-key error here.)"""
    client, bucket = s3_env["client"], s3_env["bucket"]
    root = f"s3://{bucket}/unit/{tmp_path.name}"
    stage = storage.stage_dir(root, "old")
    (stage / "a.bin").write_bytes(b"a" * 10)
    (stage / "b.bin").write_bytes(b"b" * 10)
    storage.publish(stage)
    key_a = f"unit/{tmp_path.name}/old/a.bin"

    def other_writer(**_):
        client.put_object(Bucket=bucket, Key=key_a, Body=b"rewritten")
    storage._client().meta.events.register_first("before-call.s3.DeleteObjects", other_writer)
    with pytest.raises(storage.StorageError,
                       match=rf"{root}/old: 1 of 2 objects were not deleted: '{key_a}': PreconditionFailed"):
        storage.delete(f"{root}/old")
    storage._client().meta.events.unregister("before-call.s3.DeleteObjects", other_writer)
    assert client.get_object(Bucket=bucket, Key=key_a)["Body"].read() == b"rewritten"   # the newer bytes survive
    assert not storage.exists(f"{root}/old/b.bin")

    def other_pruner(**_):                              # already gone (NoSuchKey) is what delete wanted
        client.delete_object(Bucket=bucket, Key=key_a)
    storage._client().meta.events.register_first("before-call.s3.DeleteObjects", other_pruner)
    storage.delete(f"{root}/old")
    assert not storage.exists(f"{root}/old")
