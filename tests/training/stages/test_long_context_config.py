"""The long_context config without a process: phases refused before submission naming the field (a phase longer
than the original context x s, a sequence the context-parallel layout cannot split), the papers' presets, and each
phase's training config built from the parent's architecture (what changes: the context fields only)."""
from __future__ import annotations

import pytest

from training.config import ConfigError, ModelConfig, resolve_pipeline_config, resolve_stage_config
from training.config.long_context import LongContextError, phase_configs


def _phase(seq_length: int, **fields) -> dict:
    return {"seq_length": seq_length, "factor": 4, "steps": 2, "global_batch_size": 2, "lr": 3e-4, **fields}


@pytest.mark.parametrize("overrides, field, reason", [
    ({"long_context.phases": [_phase(64), _phase(256)]},   # micro: 32 x 4 = 128 positions
     "long_context.phases.1.seq_length", "256 tokens is longer than the original context x s (32 x 4 = 128)"),
    ({"long_context.parallel.context_parallel_size": 4, "long_context.phases": [_phase(64), _phase(100)]},
     "long_context.phases.1.seq_length", "100 is not divisible by 2 x parallel.context_parallel_size (8)"),
    ({"long_context.parallel.tensor_model_parallel_size": 4, "long_context.parallel.sequence_parallel": True,
      "long_context.phases": [_phase(66)]},
     "long_context.phases.0.seq_length", "seq_length / parallel.context_parallel_size (66) is not divisible by "
                                         "parallel.tensor_model_parallel_size (4)"),
    ({"long_context.phases": [_phase(64, factor=2.7)]}, "long_context.phases.0.factor", "must be a whole number"),
    ({"long_context.phases": [_phase(64, global_batch_size=3)], "long_context.train.micro_batch_size": 2},
     "long_context.phases.0.global_batch_size", "3 is not a multiple of train.micro_batch_size (2)"),
    ({"long_context.phases": [_phase(64, beta_slow=32, beta_fast=32)]}, "long_context.phases.0.beta_slow",
     "must be below β"),
    ({"long_context.phases": [_phase(64, warmup_steps=2)]}, "long_context.phases.0.warmup_steps", "must be below"),
    ({"long_context.phases": []}, "long_context.phases", "at least 1 item"),
])
def test_a_phase_that_cannot_run_is_refused_naming_its_field(overrides, field, reason):
    with pytest.raises(ConfigError) as refused:
        resolve_pipeline_config("micro", overrides)
    assert f"{field}: " in str(refused.value) and reason in str(refused.value), str(refused.value)


def test_plain_rope_phases_are_not_bound_by_the_yarn_scale():
    cfg = resolve_stage_config("long_context", "micro", overrides={
        "rope_scaling": False, "phases": [_phase(64), _phase(256)]})
    assert [p.seq_length for p in cfg.phases] == [64, 256]


def test_the_papers_presets_carry_their_phases():
    v3 = resolve_stage_config("long_context", "deepseek-v3")
    assert [(p.seq_length, p.global_batch_size, p.steps, p.lr) for p in v3.phases] == [
        (32768, 1920, 1000, 7.3e-6), (131072, 480, 1000, 7.3e-6)]   # V3 §4.3
    assert {(p.factor, p.beta_slow, p.beta_fast, p.mscale_all_dim) for p in v3.phases} == {(40, 1, 32, 1.0)}
    assert v3.original_max_position_embeddings == 4096 and v3.parallel.context_parallel_size == 8
    v2 = resolve_stage_config("long_context", "deepseek-v2")
    assert [(p.seq_length, p.global_batch_size, p.steps, p.factor, p.mscale_all_dim) for p in v2.phases] == [
        (32768, 576, 1000, 40, 0.707)]   # V2 §3.1.4: √t = 0.0707 ln s + 1
    tiny = resolve_stage_config("long_context", "tiny")
    assert (tiny.original_max_position_embeddings, tiny.phases[0].seq_length, tiny.phases[0].factor) == (64, 256, 4)


def test_phase_configs_keep_the_parents_architecture_and_check_the_job():
    parent = resolve_stage_config("pretrain", "micro").model
    cfg = resolve_stage_config("long_context", "micro")
    phases = phase_configs(cfg, parent, data_parallel_size=1)
    assert [(p.train.seq_length, p.train.steps, p.train.global_batch_size) for p in phases] == [(64, 1, 2), (128, 4, 2)]
    for p in phases:
        assert p.model.rope_scaling.factor == 4 and p.model.rope_scaling.original_max_position_embeddings == 32
        assert p.model.max_position_embeddings == 128   # original x s, as DeepSeek's released configs
        assert p.model.architecture_differences(parent.model_dump(mode="json"), ModelConfig.CONTEXT_FIELDS) == []
        assert (p.optimizer.lr, p.optimizer.min_lr, p.optimizer.decay_style) == (3e-4, 3e-4, "constant")
    ablation = phase_configs(cfg.model_copy(update={"rope_scaling": False}), parent, 1)
    assert {(p.model.rope_scaling, p.model.max_position_embeddings) for p in ablation} == {(None, 512)}

    # A parent already extended: YaRN keeps scaling its original context.
    extended = phases[-1].model
    unset = cfg.model_copy(update={"original_max_position_embeddings": None})
    assert phase_configs(unset, extended, 1)[0].model.rope_scaling.original_max_position_embeddings == 32
    with pytest.raises(LongContextError, match=r"long_context\.phases\.0\.global_batch_size: 2 is not a multiple of "
                                               r"train\.micro_batch_size x data-parallel size \(1 x 4\)"):
        phase_configs(cfg, parent, data_parallel_size=4)
    split = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"pipeline_model_parallel_size": 2})})
    with pytest.raises(LongContextError, match=r"long_context\.phases\.0: does not fit the parent model micro"):
        phase_configs(split, parent, 1)   # 3 layers over 2 pipeline stages
