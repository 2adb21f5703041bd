"""distill without running it: a dense student by default and in the tiny preset (counted by `params`), the teacher read
from sft, and settings that cannot work refused naming the field."""
from __future__ import annotations

import pytest

from training.config import ConfigError, resolve_pipeline_config, resolve_stage_config
from training.config.distill import DistillConfig
from training.model.params import count_params


def test_the_student_is_dense_by_default_and_in_the_tiny_preset():
    assert DistillConfig().model.num_experts is None and DistillConfig().model.mtp_num_layers == 0
    pipeline = resolve_pipeline_config("tiny")
    student, teacher = pipeline.distill.model, pipeline.sft.model
    counted, teacher_counted = count_params(student), count_params(teacher)
    assert not {"router", "shared_experts", "routed_experts"} & set(counted.parts) and counted.mtp == 0
    assert (counted.total, counted.activated) == (683_136, 421_056)             # the numbers the preset's comment gives
    assert (teacher_counted.total, teacher_counted.activated) == (831_616, 471_232)
    # the same vocabulary and shape as the teacher, less its experts and MTP
    same = {"vocab_merges", "vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "multi_latent_attention"}
    assert {k: getattr(student, k) for k in same} == {k: getattr(teacher, k) for k in same}


def test_the_teacher_defaults_to_the_sft_release_and_sampling_follows_r1():
    cfg = resolve_stage_config("distill", "tiny")
    assert cfg.teacher is None and cfg.upstream("sft") == "sft" and cfg.stage_spec.upstream == ("sft",)
    assert (cfg.temperature, cfg.top_p, cfg.samples_per_prompt, cfg.epochs) == (0.6, 0.95, 4, 4)
    assert resolve_stage_config("distill", "tiny", overrides={"reads": {"sft": "sft_more"}}).upstream("sft") == \
        "sft_more"


@pytest.mark.parametrize("overrides, message", [
    ({"distill.max_new_tokens": 128}, "max_new_tokens (128) must be below train.seq_length (128)"),
    ({"distill.samples_per_prompt": 0}, "distill.samples_per_prompt: Input should be greater than or equal to 1"),
    ({"distill.temperature": 0}, "distill.temperature: Input should be greater than 0"),
    ({"distill.reads": {"pretrain": "code_cpt"}}, "reads: distill reads no ['pretrain']"),
])
def test_settings_that_cannot_work_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_pipeline_config("tiny", overrides)
    assert message in str(err.value)


def test_r1_rejection_sampling_mixes_a_share_of_direct_answers():
    """The r1 recipe's sft_rejection: the policy is its own student, reasoning, with a third as many direct answers
    (R1 §2.3.3's ~200k non-reasoning beside ~600k reasoning samples)."""
    from training.stages.distill import non_reasoning

    step = resolve_pipeline_config("tiny").stage("sft_rejection")
    assert (step.student, step.reasoning, step.non_reasoning_share) == ("teacher", True, pytest.approx(1 / 3))
    assert step.upstream("sft") == "grpo_reasoning"   # the teacher: the reasoning-RL policy
    mixed = non_reasoning(step, 300)
    assert len(mixed) == 100 and all("reasoning_content" not in r["messages"][1] for r in mixed)
    assert {r["task"] for r in mixed} == set(step.tasks.tasks) and len({r["id"] for r in mixed}) == 100
    assert non_reasoning(step.model_copy(update={"non_reasoning_share": 0.0}), 300) == []
