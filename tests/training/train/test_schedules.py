"""Schedules against the papers' numbers: DeepSeek-V3 §4.2 (lr, γ, λ) and DeepSeek LLM §2.3 (multi-step lr)."""
from __future__ import annotations

import math

import pytest

from training.train.schedules import B, T, deepseek_v3_lr, multi_step_lr, switch_at

V3 = dict(peak=2.2e-4, min_lr=2.2e-5, warmup_steps=2000, constant_tokens=10 * T, decay_tokens=4.3 * T,
          tail=[(333 * B, 2.2e-5), (167 * B, 7.3e-6)])
V3_TOKENS_PER_STEP = 15360 * 4096   # the final batch size x sequence length


def v3(tokens: float, step: int = 10**9) -> float:
    return deepseek_v3_lr(step, tokens, **V3)


def test_v3_warmup_is_linear_over_2k_steps():
    assert v3(0, step=0) == 0.0
    assert v3(1000 * V3_TOKENS_PER_STEP, step=1000) == pytest.approx(1.1e-4)
    assert v3(2000 * V3_TOKENS_PER_STEP, step=2000) == pytest.approx(2.2e-4)
    assert v3(2001 * V3_TOKENS_PER_STEP, step=2001) == 2.2e-4


def test_v3_constant_until_10t_then_cosine_to_min_over_4_3t():
    assert v3(5 * T) == 2.2e-4
    assert v3(10 * T - 1) == 2.2e-4
    assert v3(10 * T) == pytest.approx(2.2e-4)
    assert v3(10 * T + 2.15 * T) == pytest.approx((2.2e-4 + 2.2e-5) / 2)   # half way: the mean of peak and floor
    quarter = 2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert v3(10 * T + 4.3 * T / 4) == pytest.approx(quarter)
    assert v3(14.3 * T - 1e6) == pytest.approx(2.2e-5, rel=1e-6)


def test_v3_tail_333b_at_2_2e_5_then_167b_at_7_3e_6():
    assert v3(14.3 * T) == pytest.approx(2.2e-5)
    assert v3(14.3 * T + 300 * B) == pytest.approx(2.2e-5)
    assert v3(14.3 * T + 333 * B) == pytest.approx(7.3e-6)
    assert v3(14.8 * T - 1 * B) == pytest.approx(7.3e-6)
    assert v3(14.8 * T) == pytest.approx(7.3e-6)   # past the plan, the last value holds
    assert v3(20 * T) == pytest.approx(7.3e-6)


def test_v3_lr_never_increases_after_warmup():
    values = [v3(t * 0.05 * T) for t in range(0, 300)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_deepseek_llm_multi_step():
    total = 2 * T   # DeepSeek LLM 7B/67B trained on 2T tokens
    kw = dict(peak=4.2e-4, warmup_steps=2000, total_tokens=total)
    assert multi_step_lr(1000, 0, **kw) == pytest.approx(2.1e-4)
    assert multi_step_lr(2000, 0, **kw) == pytest.approx(4.2e-4)
    assert multi_step_lr(10**6, 0.5 * total, **kw) == pytest.approx(4.2e-4)
    assert multi_step_lr(10**6, 0.8 * total - 1, **kw) == pytest.approx(4.2e-4)
    assert multi_step_lr(10**6, 0.8 * total, **kw) == pytest.approx(0.316 * 4.2e-4)
    assert multi_step_lr(10**6, 0.9 * total, **kw) == pytest.approx(0.1 * 4.2e-4)
    assert multi_step_lr(10**6, total, **kw) == pytest.approx(0.1 * 4.2e-4)


def test_bias_update_speed_and_mtp_weight_switch_by_tokens():
    assert switch_at(14.3 * T - 1, 1e-3, 0.0, 14.3 * T) == 1e-3
    assert switch_at(14.3 * T, 1e-3, 0.0, 14.3 * T) == 0.0
    assert switch_at(10 * T - 1, 0.3, 0.1, 10 * T) == 0.3
    assert switch_at(10 * T, 0.3, 0.1, 10 * T) == 0.1
    assert switch_at(99 * T, 0.3, None, 10 * T) == 0.3     # no second value: no switch
    assert switch_at(99 * T, 1e-3, 0.0, None) == 1e-3      # no threshold: no switch


def test_config_checks_batch_size_rampup_and_needs_v3_token_counts():
    from pydantic import ValidationError

    from training.config import PretrainConfig

    ramp = {"start_batch_size": 3072, "batch_size_increment": 768, "ramp_tokens": 469e9}
    assert PretrainConfig(train={"global_batch_size": 15360, "batch_size_rampup": ramp}).train.batch_size_rampup
    with pytest.raises(ValidationError, match=r"global_batch_size - start_batch_size \(12288\) must be a positive "
                                              r"multiple of batch_size_increment \(1000\)"):
        PretrainConfig(train={"global_batch_size": 15360, "batch_size_rampup": {**ramp, "batch_size_increment": 1000}})
    with pytest.raises(ValidationError, match="positive multiple"):   # a ramp must grow the batch
        PretrainConfig(train={"global_batch_size": 3072, "batch_size_rampup": ramp})
    with pytest.raises(ValidationError, match=r"batch_size_rampup.start_batch_size \(3072\) must be a multiple of "
                                              r"train.micro_batch_size \(5\)"):
        PretrainConfig(train={"global_batch_size": 15360, "micro_batch_size": 5, "batch_size_rampup": ramp})
    with pytest.raises(ValidationError, match="needs optimizer.constant_tokens"):
        PretrainConfig(optimizer={"decay_style": "deepseek-v3"})
    cfg = PretrainConfig(optimizer={"decay_style": "deepseek-v3", "constant_tokens": 10e12, "decay_tokens": 4.3e12,
                                    "lr_tail": [[333e9, 2.2e-5], [167e9, 7.3e-6]]})
    assert cfg.optimizer.lr_tail == [(333e9, 2.2e-5), (167e9, 7.3e-6)]
    assert PretrainConfig().optimizer.decay_style == "cosine"   # the tiny default is unchanged


def test_trainer_scheduler_follows_the_v3_function():
    """The GPT train module's scheduler class: megatron-core's OptimizerParamScheduler with our lr function."""
    from training.config import PretrainConfig
    from training.train.schedules import lr_function

    cfg = PretrainConfig(optimizer={"decay_style": "deepseek-v3", "lr": 2.2e-4, "min_lr": 2.2e-5,
                                    "warmup_steps": 2, "constant_tokens": 4 * 2 * 64, "decay_tokens": 4 * 2 * 64,
                                    "lr_tail": [[2 * 2 * 64, 2.2e-5], [2 * 2 * 64, 7.3e-6]]},
                         train={"steps": 20, "global_batch_size": 2, "seq_length": 64})
    lr = lr_function(cfg.optimizer, cfg.train)
    assert [lr(s) for s in (0, 1, 2, 3)] == pytest.approx([0, 1.1e-4, 2.2e-4, 2.2e-4])
    assert lr(6) == pytest.approx((2.2e-4 + 2.2e-5) / 2)
    assert lr(9) == pytest.approx(2.2e-5) and lr(11) == pytest.approx(7.3e-6) and lr(19) == pytest.approx(7.3e-6)
