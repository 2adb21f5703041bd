"""The code_cpt stage end to end on the micro preset (real megatron-core steps from a real release): it records its
parent, a run killed with SIGKILL resumes bit for bit, and bad input fails before any step, naming the field."""
from __future__ import annotations

import json
import signal

import pytest

from tests.support.code_cpt import code_cpt, command, parent_release
from tests.support.layouts import losses
from tests.support.processes import kill_after


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, micro_corpus, one_process_run):
    """The micro code_cpt run (4 steps, a checkpoint every 2) from the one-process release, never interrupted."""
    root = tmp_path_factory.mktemp("code-cpt")
    out = code_cpt(root, micro_corpus, parent_release(one_process_run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout


@pytest.mark.slow
def test_code_cpt_continues_the_parent_and_records_it(uninterrupted, one_process_run):
    from training import integrity

    root, stdout = uninterrupted
    parent = parent_release(one_process_run)
    assert f"code_cpt: initialised the weights from {parent}" in stdout and "step 4/4 loss" in stdout
    manifest = json.loads((root / "code_cpt" / "manifest.json").read_text())
    assert manifest["inputs"]["parent"] == str(parent)
    lineage = manifest["outputs"]["parent"]
    assert lineage["uri"] == lineage["ref"] == str(parent) and lineage["version"] is None
    assert lineage["release_sha256"] == integrity.marker_digest(parent)   # which bytes, for register's lookup
    assert manifest["result"]["parent"] == str(parent) and manifest["metrics"]["steps"] == 4
    assert (root / "code_cpt" / "release" / "complete.json").is_file()
    # continued, not restarted: the first loss is the parent's level, far below a random init's ln(512) = 6.24
    pretrained = losses(one_process_run)
    assert losses(root)[1] < pretrained[1] - 0.1


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_ends_on_the_uninterrupted_loss(uninterrupted, micro_corpus, one_process_run,
                                                                   tmp_path):
    parent = parent_release(one_process_run)
    rc = kill_after(command(tmp_path, micro_corpus, parent), "code_cpt: saved iter_0000002", tmp_path / "killed.log")
    killed = (tmp_path / "killed.log").read_text()
    assert rc == -signal.SIGKILL and "step 4/4" not in killed, killed[-3000:]
    assert not (tmp_path / "code_cpt" / "manifest.json").exists()

    resumed = code_cpt(tmp_path, micro_corpus, parent)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 2 (8 samples consumed)" in resumed.stdout and "initialised" not in resumed.stdout
    after, whole = losses(tmp_path), losses(uninterrupted[0])
    assert sorted(after) == [3, 4] and [after[3], after[4]] == [whole[3], whole[4]]   # bit for bit
    lineage = json.loads((tmp_path / "code_cpt" / "manifest.json").read_text())["outputs"]["parent"]
    assert lineage["uri"] == str(parent)   # kept from the first start (parent.json), not from the resume


@pytest.mark.slow
def test_bad_input_fails_before_training_naming_the_field(micro_corpus, one_process_run, tmp_path):
    parent = parent_release(one_process_run)
    cases = {   # name: (overrides, keep the parent's architecture, exit status, what stderr must say)
        "unknown_version": (["init_checkpoint=models:/seekflow-micro@nowhere"], True, 3,
                            "init_checkpoint: models:/seekflow-micro@nowhere: no such registered model version"),
        "missing_release": ([f"init_checkpoint={tmp_path}/no-such-release"], True, 3,
                            f"init_checkpoint {tmp_path}/no-such-release: checkpoint"),
        "architecture": ([], False, 3, "the parent's architecture differs from `model` (model.num_layers: 4 in the "
                                       "checkpoint, 3 now)"),
        "fim_rate": (["fim_rate=1.5"], True, 2, "fim_rate: Input should be less than or equal to 1"),
        "mixture": (["mixture={math: 1.0}"], True, 3, "mixture.math: the curate manifest has no such source"),
    }
    for name, (overrides, architecture, status, message) in cases.items():
        root = tmp_path / name
        out = code_cpt(root, micro_corpus, parent, *overrides, architecture=architecture)
        assert out.returncode == status and message in out.stderr, (name, out.stdout[-2000:], out.stderr[-2000:])
        assert "step 1/" not in out.stdout and not (root / "code_cpt" / "checkpoints").exists(), name
        if status == 3:   # bad input: the operator fails the task without retrying it
            assert "SEEKFLOW_FAILURE" in out.stdout, name
