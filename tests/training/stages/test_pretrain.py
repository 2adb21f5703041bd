"""The pretrain stage end to end in a subprocess: real megatron-core steps, checkpoints, resume, MLflow metrics."""
from __future__ import annotations

import json

import pytest

from tests.support.micro import pretrain, write_corpus


@pytest.mark.slow
def test_pretrain_trains_checkpoints_resumes_and_logs(tmp_path):
    write_corpus(tmp_path)
    first = pretrain(tmp_path, 4, ramp=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "step 4/4 loss" in first.stdout and "ETA" in first.stdout
    manifest = json.loads((tmp_path / "pretrain" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4
    ckpts = tmp_path / "pretrain" / "checkpoints"
    assert (ckpts / "latest").read_text() == "4"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert (tmp_path / "pretrain" / "release" / "metadata.json").is_file()

    again = pretrain(tmp_path, 4, ramp=True)
    assert again.returncode == 0 and "skipping" in again.stdout

    longer = pretrain(tmp_path, 6, ramp=True)   # a new config (more steps) resumes from the latest checkpoint
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "resumed from step 4 (10 samples consumed)" in longer.stdout   # 2 + 2 + 2 + 4: the async save was complete
    assert "step 5/6" in longer.stdout and "step 1/6" not in longer.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["seekflow.stage"] for r in runs] == ["pretrain", "pretrain"]
    assert runs[0].data.tags["dag_run_id"] == "test-run"
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "batch_size")] == [2, 2, 2, 4]
    assert [m.value for m in client.get_metric_history(runs[1].info.run_id, "batch_size")] == [4, 4]   # continued
    history = client.get_metric_history(runs[0].info.run_id, "lm_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert all(5.0 < m.value < 7.0 for m in history)   # around ln(512) = 6.24 at the start
    assert {"mtp_loss", "grad_norm", "lr", "tokens_per_s"} <= set(runs[0].data.metrics)


def test_pretrain_without_curate_output_fails_clearly(tmp_path):
    out = pretrain(tmp_path, 2)
    assert out.returncode != 0
    assert "no manifest at" in out.stderr and "curate" in out.stderr


def test_batch_ramp_follows_megatron_rampup_and_a_resumed_run_continues_it():
    from training.data.gpt_data import BatchRamp

    # 2 → 8 sequences in increments of 2, over 12 samples: megatron's calculator grows the batch every 4 samples.
    ramp = BatchRamp(8, 2, 1, rampup=(2, 2, 12))
    microbatches, consumed = [], 0
    for _ in range(6):
        microbatches.append(ramp.num_microbatches(consumed))
        consumed += ramp.batch_size(consumed)
    assert microbatches == [1, 1, 2, 3, 4, 4]
    assert [ramp.samples_after(n) for n in range(7)] == [0, 2, 4, 8, 14, 22, 30]
    resumed = BatchRamp(8, 2, 1, rampup=(2, 2, 12))   # a new process, from a checkpoint's consumed_samples
    assert [resumed.num_microbatches(c) for c in (8, 14, 22)] == [3, 4, 4]
    assert resumed.samples_after(100) == 22 + 95 * 8
    assert BatchRamp(8, 2, 2, rampup=(4, 4, 12)).num_microbatches(0) == 1   # per data-parallel rank
    with pytest.raises(ValueError, match=r"train.batch_size_rampup.start_batch_size \(2\) must be a multiple of "
                                         r"micro_batch_size x data-parallel size \(4\)"):
        BatchRamp(8, 2, 2, rampup=(2, 2, 12))
    fixed = BatchRamp(4, 2, 2)
    assert (fixed.num_microbatches(123), fixed.samples_after(3)) == (1, 12)


def test_token_scheduled_lr_counts_the_ramps_smaller_batches():
    from training.config import PretrainConfig
    from training.data.gpt_data import BatchRamp
    from training.train.schedules import lr_function

    # Peak lr for the first 8 samples x 64 tokens, then cosine decay: a fixed batch of 8 leaves the peak after
    # step 1, the ramp (2, 2, 4, ...) only after step 3.
    cfg = PretrainConfig(optimizer={"decay_style": "deepseek-v3", "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0,
                                    "constant_tokens": 8 * 64, "decay_tokens": 64 * 64},
                         train={"steps": 20, "global_batch_size": 8, "seq_length": 64})
    fixed = lr_function(cfg.optimizer, cfg.train)
    ramped = lr_function(cfg.optimizer, cfg.train, BatchRamp(8, 2, 1, rampup=(2, 2, 12)).samples_after)
    assert fixed(1) == ramped(3) == 1e-3
    assert fixed(2) < 1e-3 and ramped(4) < 1e-3
