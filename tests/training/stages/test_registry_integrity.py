"""`models:/` references are verified: the register stage records the sha256 of the release's complete.json as the
version's `seekflow.release_sha256` tag, and a download is refused, naming the file, unless the marker matches the
tag and every file matches the marker. The artifacts are altered in the artifact store, as anyone who can write to
MLflow's artifacts could. (MLflow here: a sqlite store with local artifacts; tests/training/stages/test_registry.py
covers the same stage against a real server and S3.)"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.support.mlflow_store import sqlite_store
from tests.support.tamper import flip_byte, largest, plant_metadata
from training import integrity, registry
from training.config import resolve_stage_config

NAME = "seekflow-integrity"


@pytest.fixture
def registered(one_process_run, tmp_path):
    """A copy of the one-process run's release registered through the real register stage as NAME version 1:
    {"uri", "client", "artifacts" (the version's files in the artifact store), "release"}."""
    import mlflow

    from training.stages import register

    (tmp_path / "pretrain").mkdir()
    shutil.copy(one_process_run / "pretrain" / "manifest.json", tmp_path / "pretrain" / "manifest.json")
    release = shutil.copytree(one_process_run / "pretrain" / "release", tmp_path / "release")
    uri = sqlite_store(tmp_path)
    client = registry.mlflow_client(uri)
    client.create_experiment("seekflow", artifact_location=str(tmp_path / "artifacts"))   # not ./mlruns
    cfg = resolve_stage_config("register", "tiny", overrides={
        "run_root": str(tmp_path), "tracking.uri": uri, "model_name": NAME, "export_hf": False,
        "checkpoint": str(release)})
    try:
        assert register.run(cfg)["result"]["version"] == "1"
        artifacts = next((tmp_path / "artifacts").glob("*/artifacts/checkpoint"))
        yield {"uri": uri, "client": client, "artifacts": artifacts, "release": release, "root": tmp_path}
    finally:
        mlflow.set_tracking_uri(None)


def _resolve(registered, into="downloads"):
    return registry.resolve_release(f"models:/{NAME}/1", tracking_uri=registered["uri"],
                                    into=registered["root"] / into)


def test_the_version_carries_the_marker_digest_and_downloads_verified(registered):
    version = registered["client"].get_model_version(NAME, "1")
    digest = version.tags[registry.RELEASE_SHA256_TAG]
    assert digest == integrity.sha256_file(registered["release"] / integrity.MARKER)
    assert json.loads((registered["artifacts"] / integrity.MARKER).read_text())["files"]
    local = _resolve(registered)
    assert local.version.release_sha256 == digest and (local.path / ".metadata").is_file()
    assert _resolve(registered).path == local.path    # the verified copy is reused


def test_a_flipped_byte_in_the_artifact_store_is_refused(registered):
    shard = flip_byte(largest(registered["artifacts"]))
    with pytest.raises(registry.RegistryError, match=f"{NAME}-v1/{shard.name}: sha256"):
        _resolve(registered)
    assert not list((registered["root"] / "downloads").iterdir())   # the refused download is gone, no partial


def test_a_planted_metadata_pickle_is_refused_unread(registered):
    marker = registered["root"] / "code-ran"
    plant_metadata(registered["artifacts"], marker)
    with pytest.raises(registry.RegistryError, match=rf"{NAME}-v1/\.metadata: sha256"):
        _resolve(registered)
    assert not marker.exists()


def test_rewriting_the_marker_with_the_bytes_does_not_help(registered):
    """Whoever can write the artifacts can also recompute complete.json; the version's tag still pins the old one."""
    flip_byte(largest(registered["artifacts"]))
    integrity.seal(registered["artifacts"])
    with pytest.raises(registry.RegistryError, match=rf"complete\.json: sha256 .* models:/{NAME}/1 records"):
        _resolve(registered)


def test_a_cached_copy_altered_locally_is_downloaded_again(registered):
    first = _resolve(registered).path
    flip_byte(largest(first))
    again = _resolve(registered).path
    assert again == first
    integrity.verify_tree(again)


def test_a_version_without_the_tag_is_refused(registered):
    registered["client"].delete_model_version_tag(NAME, "1", registry.RELEASE_SHA256_TAG)
    with pytest.raises(registry.RegistryError, match=f"carries no {registry.RELEASE_SHA256_TAG} tag"):
        _resolve(registered)
