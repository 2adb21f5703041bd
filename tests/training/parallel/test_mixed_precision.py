"""`train.precision: bf16`, megatron-core's mixed precision: bf16 weights and activations with fp32 master weights.
It trains close to fp32 without being fp32, and resumes bit for bit (the master weights are in the checkpoint)."""
from __future__ import annotations

import pytest

from tests.support.layouts import STEPS, command, losses, rerun_from_step_2, run


@pytest.mark.slow
def test_bf16_trains_close_to_fp32_and_resumes_exactly(micro_corpus, one_process_run, tmp_path):
    bf16 = command(tmp_path / "bf16", micro_corpus, 1, "train.precision=bf16", "train.save_interval=2")
    run(bf16)
    full, mixed = losses(one_process_run), losses(tmp_path / "bf16")   # the same run in fp32, and in bf16
    assert sorted(mixed) == sorted(full) == list(range(1, STEPS + 1))
    assert all(abs(mixed[s] - full[s]) < 1e-2 for s in full), (mixed, full)   # near ln(512) = 6.24
    assert any(mixed[s] != full[s] for s in full)   # and really computed in bf16

    resumed = rerun_from_step_2(tmp_path / "bf16", bf16)   # as if the job died right after the step-2 save
    assert sorted(resumed) == [3, 4]
    assert [resumed[3], resumed[4]] == [mixed[3], mixed[4]]   # bit for bit


def test_paper_presets_train_in_their_papers_precision_and_tiny_in_fp32():
    from training.config import resolve_stage_config

    for preset in ("deepseek-v2", "deepseek-v2-lite", "deepseek-moe-16b"):
        assert resolve_stage_config("pretrain", preset).train.precision == "bf16", preset
    assert resolve_stage_config("pretrain", "deepseek-v3").train.precision == "fp8"   # V3 §3.3
    assert resolve_stage_config("pretrain", "tiny").train.precision == "fp32"   # exact layout parity on CPU
