"""grpo without running it: R1-Zero's defaults (in step with grpo_loss.PRESETS), the base model as its input, and
the rules that keep a rollout whole refused naming the field: one rollout per global batch, checkpoints between
rollouts, no model parallelism (data parallelism only)."""
from __future__ import annotations

import pytest

from training.config import STAGES, ConfigError, resolve_pipeline_config, resolve_stage_config
from training.config.grpo import R1_ZERO, GrpoConfig
from training.rl.grpo_loss import PRESETS


def test_defaults_are_r1_zeros_and_the_input_is_the_base_model():
    preset = PRESETS["deepseek_r1_zero"]
    assert {k: preset[k] for k in ("lr", "beta", "group_size", "temperature", "epsilon")} == \
        {k: R1_ZERO[k] for k in ("lr", "beta", "group_size", "temperature", "epsilon")}
    assert R1_ZERO["prompts_per_step"] * R1_ZERO["group_size"] == preset["batch_size"]
    cfg = GrpoConfig()
    assert (cfg.group_size, cfg.prompts_per_step, cfg.beta, cfg.epsilon, cfg.optimizer.lr, cfg.temperature) == (
        16, 32, 0.001, 10.0, 3e-6, 1.0)
    assert cfg.train.global_batch_size == 512 and cfg.aggregation == preset["aggregation"] and cfg.scale_by_std
    assert cfg.rewards.model_dump() == {"format": 1.0, "accuracy": 1.0, "language": 0.0}
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in cfg.system_prompt
    assert cfg.stage_spec.upstream == ("pretrain",) and cfg.stage_spec.gpus_per_node == 0   # every GPU: data parallel
    assert list(STAGES)[-3:] == ["distill", "grpo", "compress"]
    tiny = resolve_stage_config("grpo", "tiny")
    assert tiny.train.global_batch_size == tiny.prompts_per_step * tiny.group_size


@pytest.mark.parametrize("overrides, message", [
    ({"grpo.train.global_batch_size": 32},
     "train.global_batch_size (32) must equal prompts_per_step x group_size (8 x 8 = 64)"),
    ({"grpo.updates_per_rollout": 4},
     "train.save_interval (10) must be a multiple of updates_per_rollout (4)"),
    ({"grpo.updates_per_rollout": 2, "grpo.train.steps": 31},
     "train.steps (31) must be a multiple of updates_per_rollout (2)"),
    ({"grpo.updates_per_rollout": 2, "grpo.reference_reset_steps": 3},
     "reference_reset_steps (3) must be a multiple of updates_per_rollout (2)"),
    ({"grpo.parallel.tensor_model_parallel_size": 2, "grpo.parallel.sequence_parallel": True},
     ("parallel.tensor_model_parallel_size is 2: grpo's rollouts decode under data, pipeline and expert "
      "parallelism only; under this one they are not built")),
    ({"grpo.parallel.context_parallel_size": 2}, "parallel.context_parallel_size is 2"),
    ({"grpo.max_new_tokens": 192}, "max_new_tokens (192) must be below train.seq_length (192)"),
    ({"grpo.group_size": 1}, "grpo.group_size: Input should be greater than or equal to 2"),
    ({"grpo.moe_router": "fixed"}, "grpo.moe_router: Input should be 'bias_updates_off', 'frozen' or 'as_trained'"),
])
def test_settings_that_cannot_work_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_pipeline_config("tiny", overrides)
    assert message in str(err.value)


def test_prompts_too_long_for_a_sequence_are_refused_before_training():
    from training.stages.grpo import GrpoError, check_lengths, prompts

    cfg = resolve_stage_config("grpo", "tiny", overrides=["tasks.train_items=200"])
    check_lengths(cfg, prompts(cfg))   # the preset fits: 133-token prompts + 32 new in 192
    short = resolve_stage_config("grpo", "tiny", overrides=["tasks.train_items=200", "train.seq_length=160"])
    with pytest.raises(GrpoError, match=r"train.seq_length \(160\) is shorter than the longest prompt \(13\d tokens"):
        check_lengths(short, prompts(short))


def test_a_data_parallel_size_must_split_the_rollout_into_whole_groups():
    from training.stages.grpo import GrpoError, check_data_parallel

    cfg = resolve_stage_config("grpo", "tiny")   # 8 prompts x G 8, micro-batches of 8
    check_data_parallel(cfg, 1), check_data_parallel(cfg, 2), check_data_parallel(cfg, 8)
    with pytest.raises(GrpoError, match=r"prompts_per_step \(8\) must be a multiple of the 3 data-parallel ranks"):
        check_data_parallel(cfg, 3)
    with pytest.raises(GrpoError, match=r"train.global_batch_size \(64\) must be a multiple of train.micro_batch_size"):
        check_data_parallel(cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 16})}), 8)
