"""Integrity before deserialisation: every file of a checkpoint or release is hashed at save (complete.json) and
verified before torch or pickle reads a byte of it. A tampered copy of the shared one-process run's checkpoint and
release is refused, naming the file, by resume, init_checkpoint (registry.resolve_release, load_weights), evaluate's
load_release and export; a `.metadata` that would run code when unpickled never gets the chance."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.support.layouts import command, run
from tests.support.tamper import flip_byte, largest, plant_metadata
from training import checkpoint, integrity, registry
from training.integrity import IntegrityError


# ------------------------------------------------------------------------------------------- the module alone --
def _tree(root):
    root.mkdir()
    (root / "metadata.json").write_text("{}")
    (root / ".metadata").write_bytes(b"m" * 64)
    (root / "sub").mkdir()
    (root / "sub" / "__0_0.distcp").write_bytes(os.urandom(3 * integrity.CHUNK // 2))   # more than one chunk
    return root


def test_seal_records_every_file_and_verify_accepts_it(tmp_path):
    root = _tree(tmp_path / "ck")
    files = integrity.seal(root, step=3)
    marker = json.loads((root / integrity.MARKER).read_text())
    assert marker["step"] == 3 and marker["files"] == files
    assert set(files) == {"metadata.json", ".metadata", "sub/__0_0.distcp"}
    assert files["sub/__0_0.distcp"]["size"] == 3 * integrity.CHUNK // 2
    integrity.verify_tree(root)
    (root / ".x.distcp.123.part").write_bytes(b"an interrupted download")   # storage's temporary: never read
    integrity.verify_tree(root)


@pytest.mark.parametrize("tamper,named", [
    (lambda root: flip_byte(root / "sub" / "__0_0.distcp", integrity.CHUNK + 5), "sub/__0_0.distcp: sha256"),
    (lambda root: (root / "common.pt").write_bytes(b"planted"), "common.pt is not listed in complete.json"),
    (lambda root: (root / "sub" / "rng.pt").write_bytes(b"planted"), "sub/rng.pt is not listed"),
    (lambda root: (root / "metadata.json").unlink(), "metadata.json is missing"),
    (lambda root: ((root / ".metadata").unlink(), (root / ".metadata").symlink_to(root / "metadata.json")),
     ".metadata is a symlink"),
    (lambda root: (root / integrity.MARKER).unlink(), "has no complete.json"),
    (lambda root: (root / integrity.MARKER).write_text(json.dumps({"files": {"metadata.json": 2}})),
     "records no sha256 for metadata.json"),
])
def test_verify_names_the_file(tmp_path, tamper, named):
    root = _tree(tmp_path / "ck")
    integrity.seal(root)
    integrity.verify_tree(root)     # remembered as verified: a change after it must still be seen
    tamper(root)
    with pytest.raises(IntegrityError, match=named.replace(".", r"\.")):
        integrity.verify_tree(root)


def test_a_change_that_keeps_size_and_mtime_is_still_seen(tmp_path):
    root = _tree(tmp_path / "ck")
    integrity.seal(root)
    integrity.verify_tree(root)
    shard = root / "sub" / "__0_0.distcp"
    before = shard.stat()
    flip_byte(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))   # the ctime moves on regardless
    with pytest.raises(IntegrityError, match="sub/__0_0.distcp"):
        integrity.verify_tree(root)


# ----------------------------------------------------------------------- tampered copies of a real checkpoint --
@pytest.fixture
def run_copy(one_process_run, tmp_path):
    """The one-process run's checkpoints (iter_0000004, latest) and release, copied: tests may alter them."""
    root = tmp_path / "run"
    for part in ("checkpoints", "release"):
        shutil.copytree(one_process_run / "pretrain" / part, root / "pretrain" / part)
    return root / "pretrain"


def test_a_real_save_records_what_it_wrote(run_copy):
    for directory in (run_copy / "checkpoints" / "iter_0000004", run_copy / "release"):
        files = json.loads((directory / integrity.MARKER).read_text())["files"]
        assert {".metadata", "common.pt", "metadata.json"} <= set(files), sorted(files)
        assert all(len(entry["sha256"]) == 64 for entry in files.values())
        integrity.verify_tree(directory)
    assert "seekflow_model.json" in json.loads((run_copy / "release" / integrity.MARKER).read_text())["files"]


def test_resume_refuses_a_flipped_byte_in_a_shard(run_copy):
    shard = flip_byte(largest(run_copy / "checkpoints" / "iter_0000004"))
    # No model is needed: the refusal comes before anything is read into one.
    with pytest.raises(IntegrityError, match=f"iter_0000004/{shard.name}: sha256 .* recorded at save"):
        checkpoint.load(run_copy / "checkpoints", None, None, None)


def test_resume_refuses_a_planted_metadata_pickle_unread(run_copy, tmp_path):
    marker = tmp_path / "code-ran"
    step_dir = run_copy / "checkpoints" / "iter_0000004"
    plant_metadata(step_dir, marker)   # same size as the real one: only its hash tells
    with pytest.raises(IntegrityError, match=r"iter_0000004/\.metadata: sha256"):
        checkpoint.load(run_copy / "checkpoints", None, None, None)
    assert not marker.exists()
    # The control: what dist_checkpointing would have done with that file (the code runs; the "metadata" it returns,
    # None, then fails torch's own check).
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):
        FileSystemReader(str(step_dir)).read_metadata()
    assert marker.exists()


def test_a_planted_metadata_of_another_size_is_skipped_as_torn(run_copy, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    plant_metadata(run_copy / "checkpoints" / "iter_0000004", marker, same_size=False)
    assert checkpoint.load(run_copy / "checkpoints", None, None, None) is None   # nothing older: a fresh start
    assert "skipping torn checkpoint: iter_0000004/.metadata has" in capsys.readouterr().err
    assert not marker.exists()


def test_release_loaders_refuse_a_flipped_byte(run_copy, tmp_path):
    from training.export import ExportError, export_hf
    from training.model.release import load_release

    release = run_copy / "release"
    shard = flip_byte(largest(release))
    named = f"release/{shard.name}: sha256"
    with pytest.raises(registry.RegistryError, match=named):   # evaluate, register, pretrain's init_checkpoint
        registry.resolve_release(str(release), tracking_uri="sqlite:///unused.db", into=tmp_path / "downloads")
    with pytest.raises(IntegrityError, match=named):           # init_checkpoint's load, before the model is touched
        checkpoint.load_weights(release, None)
    with pytest.raises(IntegrityError, match=named):           # evaluate's load, before a model is built
        load_release(release)
    with pytest.raises(ExportError, match=named):              # python -m training.export hf
        export_hf(release, tmp_path / "hf", log=lambda line: None)
    assert not (tmp_path / "hf").exists()


def test_a_release_without_its_marker_is_refused(run_copy, tmp_path):
    (run_copy / "release" / integrity.MARKER).unlink()
    with pytest.raises(registry.RegistryError, match="incomplete: release has no complete.json"):
        registry.resolve_release(str(run_copy / "release"), tracking_uri="sqlite:///unused.db", into=tmp_path)


# ------------------------------------------------------------------------------------ through the real stage --
@pytest.mark.slow
def test_pretrain_refuses_planted_metadata_on_resume_and_as_init_checkpoint(run_copy, micro_corpus, tmp_path):
    marker = tmp_path / "code-ran"
    plant_metadata(run_copy / "checkpoints" / "iter_0000004", marker)
    resumed = run(command(run_copy.parent, micro_corpus, 1, "train.steps=6"), check=False)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode != 0 and "iter_0000004/.metadata: sha256" in output, output[-3000:]
    assert "pretrain: step" not in resumed.stdout and not marker.exists()

    plant_metadata(run_copy / "release", marker)
    started = run(command(tmp_path / "b", micro_corpus, 1, f"init_checkpoint={run_copy / 'release'}"), check=False)
    output = started.stdout + started.stderr
    assert started.returncode != 0 and "release/.metadata: sha256" in output, output[-3000:]
    assert "pretrain: step" not in started.stdout and not marker.exists()
