"""The pretrain stage end to end in a subprocess: real megatron-core steps, checkpoints, resume, MLflow metrics."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_training
from training.data.synthetic import write_synthetic_curate

VOCAB = 512


def fake_curate(run_root):
    """A curate manifest over a small indexed dataset of patterned token streams (learnable, vocab 512)."""
    write_synthetic_curate(run_root, vocab_size=VOCAB, documents=200)


def pretrain(run_root, steps, *extra):
    return run_training(
        "pretrain", "--preset", "tiny", "--set", f"run_root={run_root}", "--set", f"model.vocab_size={VOCAB}",
        "--set", f"train.steps={steps}", "--set", "optimizer.warmup_steps=1", "--set", "train.seq_length=32",
        "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4", "--set", "train.log_interval=1",
        "--set", "train.save_interval=2", "--set", f"tracking.uri=sqlite:///{run_root}/mlflow.db",
        "--set", "tracking.tags.dag_run_id=test-run", *extra)


@pytest.mark.slow
def test_pretrain_trains_checkpoints_resumes_and_logs(tmp_path):
    fake_curate(tmp_path)
    first = pretrain(tmp_path, 4)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "step 4/4 loss" in first.stdout and "ETA" in first.stdout
    manifest = json.loads((tmp_path / "pretrain" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4
    ckpts = tmp_path / "pretrain" / "checkpoints"
    assert (ckpts / "latest").read_text() == "4"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert (tmp_path / "pretrain" / "release" / "metadata.json").is_file()

    again = pretrain(tmp_path, 4)
    assert again.returncode == 0 and "skipping" in again.stdout

    longer = pretrain(tmp_path, 6)   # a new config (more steps) resumes from the latest checkpoint
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "resumed from step 4 (16 samples consumed)" in longer.stdout
    assert "step 5/6" in longer.stdout and "step 1/6" not in longer.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["seekflow.stage"] for r in runs] == ["pretrain", "pretrain"]
    assert runs[0].data.tags["dag_run_id"] == "test-run"
    history = client.get_metric_history(runs[0].info.run_id, "lm_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert all(5.0 < m.value < 7.0 for m in history)   # around ln(512) = 6.24 at the start
    assert {"mtp_loss", "grad_norm", "lr", "tokens_per_s"} <= set(runs[0].data.metrics)


def test_pretrain_without_curate_output_fails_clearly(tmp_path):
    out = pretrain(tmp_path, 2)
    assert out.returncode != 0
    assert "no manifest at" in out.stderr and "curate" in out.stderr
