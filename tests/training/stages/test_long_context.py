"""The long_context stage end to end on the micro preset, in subprocesses with real megatron-core steps: two YaRN
phases chained from a parent release with their lineage, kill -9 mid-phase then a resume that ends on the
uninterrupted loss bit for bit, the extension starting from the parent's weights with only the context changed, and
bad input refused before any step, naming the field."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.long_context import kill_9_after, long_context, phase_losses
from tests.support.mlflow_store import sqlite_store
from tests.support.processes import ok

YARN = {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale_all_dim": 1.0, "mscale": 1.0}   # the micro preset's phases (tests/support/presets/micro.yaml)


@pytest.fixture(scope="module")
def parent(one_process_run):
    return one_process_run / "pretrain" / "release"   # micro, 4 layers, 4 steps of 32 tokens


@pytest.fixture(scope="module")
def extended(tmp_path_factory, parent, micro_corpus):
    """The micro preset's two phases (64, then 128 tokens) from `parent`, uninterrupted."""
    root = tmp_path_factory.mktemp("long-context")
    out = ok(long_context(root, parent, micro_corpus))
    return {"root": root, "stdout": out.stdout, "manifest": json.loads((root / "long_context" / "manifest.json")
                                                                       .read_text())}


def _model(release) -> dict:
    return json.loads((release / "seekflow_model.json").read_text())


@pytest.mark.slow
def test_phases_chain_from_the_parent_with_yarn_and_record_the_lineage(extended, parent):
    from training import integrity

    root, manifest = extended["root"], extended["manifest"]
    stage = root / "long_context"
    assert f"long_context/phase_0: initialised the weights from {parent}" in extended["stdout"]
    assert f"long_context/phase_1: initialised the weights from {stage}/phase_0/release" in extended["stdout"]
    outputs, phases = manifest["outputs"], manifest["outputs"]["phases"]
    assert outputs["release_checkpoint"] == str(stage / "phase_1" / "release") == phases[1]["release_checkpoint"]
    assert [p["seq_length"] for p in phases] == [64, 128] and [p["steps"] for p in phases] == [1, 4]
    assert [p["started_from"] for p in phases] == [str(parent), str(stage / "phase_0" / "release")]
    assert outputs["parent"] == {"ref": str(parent), "uri": str(parent), "model_name": None, "version": None,
                                 "manifest_hash": None, "release_sha256": integrity.marker_digest(parent)}
    assert manifest["inputs"]["parent_release_sha256"] == outputs["parent"]["release_sha256"]
    assert manifest["metrics"]["final_loss"] == phases[1]["final_loss"] and manifest["metrics"]["steps"] == 5
    assert manifest["metrics"]["tokens"] == 1 * 2 * 64 + 4 * 2 * 128

    before = _model(parent)   # the parent's architecture, plain RoPE over 512 positions
    for phase in ("phase_0", "phase_1"):
        after = _model(stage / phase / "release")
        assert after["rope_scaling"] == YARN and after["max_position_embeddings"] == 32 * 4
        assert {k: v for k, v in after.items() if k not in ("rope_scaling", "max_position_embeddings")} == \
            {k: v for k, v in before.items() if k not in ("rope_scaling", "max_position_embeddings")}
    assert before["rope_scaling"] is None

    import mlflow

    client = mlflow.MlflowClient(sqlite_store(root))
    run = client.get_run(outputs["mlflow_run_id"])
    assert run.data.tags["seekflow.stage"] == "long_context" and run.data.tags["seekflow.init_checkpoint"] == str(parent)
    for i, phase in enumerate(phases):   # one nested run per phase, with its own steps
        child = client.get_run(phase["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert child.data.params["seq_length"] == str(phase["seq_length"])
    assert sorted(phase_losses(root, 1)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_9_mid_phase_then_resume_ends_on_the_uninterrupted_loss(extended, parent, micro_corpus, tmp_path):
    killed = kill_9_after(tmp_path, parent, micro_corpus, "long_context/phase_1: saved iter_0000002")
    assert "Traceback" not in killed and "long_context/phase_1: step 3/4" not in killed
    assert not (tmp_path / "long_context" / "manifest.json").exists()

    resumed = ok(long_context(tmp_path, parent, micro_corpus))
    assert "long_context/phase_0: already done with these settings and starting weights; skipping" in resumed.stdout
    assert "long_context/phase_1: resumed from step 2 (4 samples consumed)" in resumed.stdout, resumed.stdout[-3000:]
    assert "long_context/phase_1: step 1/4" not in resumed.stdout
    uninterrupted = phase_losses(extended["root"], 1)
    assert phase_losses(tmp_path, 1) == {3: uninterrupted[3], 4: uninterrupted[4]}   # bit for bit
    manifest = json.loads((tmp_path / "long_context" / "manifest.json").read_text())
    assert manifest["metrics"]["final_loss"] == extended["manifest"]["metrics"]["final_loss"]

    # A phase whose settings change starts over (never resuming the old checkpoints); the phase before it is kept.
    phases = ("phases=[{seq_length: 64, factor: 4, steps: 1, global_batch_size: 2, lr: 3.0e-4}, "
              "{seq_length: 128, factor: 4, steps: 2, global_batch_size: 2, lr: 1.0e-4}]")
    changed = ok(long_context(tmp_path, parent, micro_corpus, phases))
    assert "long_context/phase_0: already done" in changed.stdout
    assert "long_context/phase_1: settings or starting weights changed; starting the phase over" in changed.stdout
    assert "long_context/phase_1: initialised the weights from" in changed.stdout and "resumed" not in changed.stdout


def _weights(release, tmp_path, name) -> dict[str, torch.Tensor]:
    """A release's tensors by checkpoint key (torch.distributed.checkpoint; no megatron), expert biases aside (the
    parent's router updates them by its own rate, not the learning rate)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(release), str(tmp_path / f"{name}.pt"))
    state = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k and "expert_bias" not in k}


@pytest.mark.slow
def test_the_extension_starts_from_the_parents_weights_and_changes_only_the_positions(parent, micro_corpus,
                                                                                      tmp_path):
    """At a learning rate (1e-12) that leaves the weights where they start, YaRN's phase and its ablation (rope_scaling
    off) both end on the parent's weights: what an extension changes is how positions are encoded, not the model."""
    one_phase = "phases=[{seq_length: 128, factor: 4, steps: 1, global_batch_size: 2, lr: 1.0e-12}]"
    ok(long_context(tmp_path, parent, micro_corpus, one_phase))
    ok(long_context(tmp_path, parent, micro_corpus, one_phase, "name=long_context_plain", "rope_scaling=false"))
    before = _weights(parent, tmp_path, "parent")
    for stage, rope in (("long_context", YARN), ("long_context_plain", None)):
        release = tmp_path / stage / "phase_0" / "release"
        after = _weights(release, tmp_path, stage)
        assert sorted(after) == sorted(before) and len(before) > 50
        assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-8, stage
        assert _model(release)["rope_scaling"] == rope
    assert _model(tmp_path / "long_context_plain" / "phase_0" / "release")["max_position_embeddings"] == 512


@pytest.mark.slow
def test_bad_input_fails_before_any_step_naming_the_field(parent, micro_corpus, tmp_path):
    def refused(*extra: str) -> str:
        out = long_context(tmp_path, parent, micro_corpus, *extra)
        assert out.returncode == 3 and out.stdout.startswith("SEEKFLOW_FAILURE "), out.stdout[-2000:] + out.stderr
        assert " step " not in out.stdout and not (tmp_path / "long_context" / "phase_0").exists()
        return out.stderr

    missing = tmp_path / "no-such-release"
    assert f"long_context.init_checkpoint: checkpoint {missing} does not exist" in refused(
        f"init_checkpoint={missing}")
    assert ("long_context.init_checkpoint: models:/seekflow-micro@champion: no such registered model version"
            in refused("init_checkpoint=models:/seekflow-micro@champion"))
    # Without original_max_position_embeddings, YaRN scales the parent's max_position_embeddings (512): 4 x 512 = 2048.
    too_long = ("phases=[{seq_length: 64, factor: 4, steps: 1, global_batch_size: 2, lr: 3.0e-4}, "
                "{seq_length: 4096, factor: 4, steps: 1, global_batch_size: 2, lr: 3.0e-4}]")
    assert ("long_context.phases.1.seq_length: 4096 tokens is longer than the original context x s (512 x 4 = 2048)"
            in refused("original_max_position_embeddings=null", too_long))
