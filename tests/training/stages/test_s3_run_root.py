"""Run roots on a real S3-compatible server (SeaweedFS): the storage layer, and stages that share nothing but the
object store — curate shards, the merge, pretrain, a resumed pretrain and register each get their own empty scratch
directory, as separate Kubernetes pods would."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.processes import run_training
from training import storage


def test_publish_fetch_round_trip(s3_env, tmp_path):
    root = f"s3://{s3_env['bucket']}/unit/{tmp_path.name}"
    stage = storage.stage_dir(root, "curate")
    assert stage == tmp_path / "scratch" / "s3" / s3_env["bucket"] / "unit" / tmp_path.name / "curate"
    (stage / "data").mkdir()
    (stage / "data" / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (stage / "manifest.json").write_text("{}")
    assert storage.publish(stage, exclude=("manifest.json",)) == f"{root}/curate"
    assert storage.exists(f"{root}/curate/data/a.bin") and not storage.exists(f"{root}/curate/manifest.json")

    storage.write_text(f"{root}/curate/marker", "7")
    assert storage.read_text(f"{root}/curate/marker") == "7"
    assert storage.read_text(f"{root}/curate/absent") is None

    other = tmp_path / "other-scratch"                  # a second machine: nothing local yet
    import os
    os.environ[storage.SCRATCH_ENV] = str(other)
    local = storage.fetch(f"{root}/curate/data")
    assert (local / "a.bin").read_bytes() == b"\x00\x01" * 1000 and str(local).startswith(str(other))
    assert not list(local.glob("*.part"))
    assert storage.uri_of(local / "a.bin", root) == f"{root}/curate/data/a.bin"

    storage.delete(f"{root}/curate")
    assert not storage.exists(f"{root}/curate/data/a.bin")


def test_errors_name_the_uri(s3_env, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"s3://seekflow-test/nothing/here: no such object or prefix"):
        storage.fetch("s3://seekflow-test/nothing/here")
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-xyz/x: NoSuchBucket"):
        storage.fetch("s3://no-such-bucket-xyz/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.local_dir("s3:///prefix-only")
    with pytest.raises(storage.StorageError, match="scheme 'gs' is not supported"):
        storage.local_dir("gs://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")   # nothing listens on the discard port
    storage._client.cache_clear()
    with pytest.raises(storage.StorageError, match=r"s3://seekflow-test/x: EndpointConnectionError"):
        storage.exists("s3://seekflow-test/x")


def _stage(stage, root, scratch, *sets, env=None):
    args = [stage, "--preset", "tiny", "--set", f"run_root={root}", *sum((["--set", s] for s in sets), [])]
    return run_training(*args, env={storage.SCRATCH_ENV: str(scratch), **(env or {})})


@pytest.mark.slow
def test_stages_share_only_the_object_store(s3_env, tmp_path, mlflow_server):
    root = f"s3://{s3_env['bucket']}/runs/{tmp_path.name}"
    env = {**s3_env["env"], "MLFLOW_TRACKING_URI": mlflow_server}
    curate_sets = ["shards=2", "sources=[{kind: package_metadata, max_documents: 20}, "
                   "{kind: package_code, max_documents: 30, max_file_bytes: 50000}]"]
    with ThreadPoolExecutor(2) as pool:                   # two shard pods, side by side
        shards = pool.map(lambda index: _stage("curate", root, tmp_path / f"shard{index}", *curate_sets, env={
            **env, "SEEKFLOW_NUM_SHARDS": "2", "JOB_COMPLETION_INDEX": str(index)}), (0, 1))
        for out in shards:
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    merge = _stage("curate", root, tmp_path / "merge", *curate_sets, env=env)
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-3000:]
    assert merge.stdout.count("already done, skipping") == 2
    curated = json.loads(storage.read_text(f"{root}/curate/manifest.json"))
    assert all(d["prefix"].startswith(f"{root}/curate/data/") for d in curated["outputs"]["datasets"])

    train = ["train.steps={}", "optimizer.warmup_steps=1", "train.seq_length=32", "train.log_interval=1",
             "train.save_interval=2"]
    first = _stage("pretrain", root, tmp_path / "pretrain1", *(s.format(4) for s in train), env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert storage.read_text(f"{root}/pretrain/checkpoints/latest") == "4"
    assert storage.exists(f"{root}/pretrain/checkpoints/iter_0000004/metadata.json")
    assert storage.exists(f"{root}/pretrain/release/seekflow_model.json")
    manifest = json.loads(storage.read_text(f"{root}/pretrain/manifest.json"))
    assert manifest["outputs"]["release_checkpoint"] == f"{root}/pretrain/release"

    resumed = _stage("pretrain", root, tmp_path / "pretrain2", *(s.format(6) for s in train), env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout and "step 1/6" not in resumed.stdout
    assert storage.read_text(f"{root}/pretrain/checkpoints/latest") == "6"
    keys = {key for key, _ in storage._list(f"{root}/pretrain/checkpoints")}
    assert not any("iter_0000002" in k for k in keys)     # keep_last 2: the oldest is pruned remotely too

    register = _stage("register", root, tmp_path / "register", env=env)
    assert register.returncode == 0, register.stdout[-2000:] + register.stderr[-3000:]
    assert "created seekflow-tiny version" in register.stdout
