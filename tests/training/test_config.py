"""Config: presets validate, overrides apply, and every error names the field."""
import subprocess
import sys

import pytest

from training.config import (
    ConfigError,
    PretrainConfig,
    config_hash,
    list_presets,
    resolve_pipeline_config,
    resolve_stage_config,
)


def test_presets_include_tiny_and_papers():
    assert {"tiny", "deepseek-v3", "deepseek-v2-lite"} <= set(list_presets())


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3", "deepseek-v2-lite"])
@pytest.mark.parametrize("stage", ["curate", "pretrain", "register"])
def test_every_preset_validates_for_every_stage(preset, stage):
    cfg = resolve_stage_config(stage, preset)
    assert cfg.profile == preset


def test_deepseek_v3_carries_the_papers_architecture():
    m = resolve_stage_config("pretrain", "deepseek-v3").model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (61, 7168, 128)
    assert (m.kv_lora_rank, m.q_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim) == (512, 1536, 128, 64)
    assert (m.num_experts, m.moe_router_topk, m.moe_shared_experts, m.first_k_dense_layers) == (256, 8, 1, 3)
    assert (m.moe_router_group_topk, m.mtp_num_layers, m.mtp_loss_scaling_factor) == (4, 1, 0.3)
    assert m.moe_router_score_function == "sigmoid" and m.moe_router_enable_expert_bias


def test_deepseek_v3_ramps_its_batch_size_over_469b_tokens():
    train = resolve_stage_config("pretrain", "deepseek-v3").train
    ramp = train.batch_size_rampup
    assert (ramp.start_batch_size, train.global_batch_size, ramp.ramp_tokens) == (3072, 15360, 469e9)


def test_virtual_pipeline_and_context_parallel_are_checked_up_front():
    vpp = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
           "model.num_layers=4"]
    assert resolve_stage_config("pretrain", "tiny", overrides=vpp).parallel.virtual_pipeline_model_parallel_size == 2
    with pytest.raises(ConfigError, match="needs pipeline_model_parallel_size >= 2"):
        resolve_stage_config("pretrain", "tiny", overrides=["parallel.virtual_pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"model.num_layers \(6\) must be divisible by .* \(2 x 2\)"):
        resolve_stage_config("pretrain", "tiny", overrides=[*vpp, "model.num_layers=6"])
    with pytest.raises(ConfigError, match="unset decoder_first/last_pipeline_num_layers"):
        resolve_stage_config("pretrain", "tiny", overrides=[*vpp, "parallel.decoder_first_pipeline_num_layers=1"])
    cp = ["parallel.context_parallel_size=2"]
    assert resolve_stage_config("pretrain", "tiny", overrides=cp).parallel.context_parallel_size == 2
    with pytest.raises(ConfigError, match=r"train.seq_length \(42\) must be divisible by 2 x "
                                          r"parallel.context_parallel_size \(4\)"):
        resolve_stage_config("pretrain", "tiny", overrides=[*cp, "train.seq_length=42"])
    with pytest.raises(ConfigError, match=r"train.seq_length / parallel.context_parallel_size \(12\) must be "
                                          r"divisible by parallel.tensor_model_parallel_size \(8\)"):
        resolve_stage_config("pretrain", "tiny", overrides=[*cp, "train.seq_length=24",
                                                            "parallel.sequence_parallel=true",
                                                            "parallel.tensor_model_parallel_size=8"])


def test_stage_layers_follow_megatrons_pipeline_split():
    from training.config.models import ParallelConfig, stage_layers

    uneven = ParallelConfig(pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=1,
                            decoder_last_pipeline_num_layers=3)
    assert stage_layers(8, uneven) == [[0], [1, 2, 3, 4], [5, 6, 7]]
    interleaved = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert stage_layers(8, interleaved) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_an_all_dense_stage_under_expert_parallel_distributed_optimizer_is_refused_without_te_or_apex():
    layout = ["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
              "parallel.decoder_first_pipeline_num_layers=1", "parallel.expert_model_parallel_size=2"]
    with pytest.raises(ValueError, match=r"pipeline stage 0 holds only dense layers \(1; model.first_k_dense_layers "
                                         r"is 1\).*parallel.expert_model_parallel_size 2"):
        resolve_stage_config("pretrain", "tiny", overrides=layout).check_checkpointable_without_fused_adam()
    # an MoE layer on every stage, or no distributed optimizer, is fine
    fine = [[*layout[:2], "parallel.decoder_first_pipeline_num_layers=2", layout[3]],
            [*layout, "parallel.use_distributed_optimizer=false"]]
    for overrides in fine:
        resolve_stage_config("pretrain", "tiny", overrides=overrides).check_checkpointable_without_fused_adam()
    # V3's own layout (3 dense layers on stage 0) needs TE or Apex, which GPU clusters have
    with pytest.raises(ValueError, match=r"pipeline stage 0 holds only dense layers \(1, 2, 3;"):
        resolve_stage_config("pretrain", "deepseek-v3").check_checkpointable_without_fused_adam()


def test_deepseek_v2_lite_uses_softmax_gating_without_q_compression():
    m = resolve_stage_config("pretrain", "deepseek-v2-lite").model
    assert m.q_lora_rank is None and m.moe_router_score_function == "softmax"
    assert (m.num_experts, m.moe_router_topk, m.moe_shared_experts) == (64, 6, 2)


def test_set_overrides_parse_yaml_values():
    cfg = resolve_stage_config("pretrain", "tiny", overrides=["train.steps=7", "optimizer.warmup_steps=2", "model.q_lora_rank=null",
                                                              "tracking.tags.dag_run_id=abc"])
    assert cfg.train.steps == 7 and cfg.model.q_lora_rank is None and cfg.tracking.tags == {"dag_run_id": "abc"}


@pytest.mark.parametrize("override, field", [
    ("model.num_layers=-3", "model.num_layers"),
    ("train.steps=zero", "train.steps"),
    ("model.moe_router_score_function=relu", "model.moe_router_score_function"),
    ("model.no_such_field=1", "model.no_such_field"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        resolve_stage_config("pretrain", "tiny", overrides=[override])
    assert f"  {field}:" in str(err.value)


def test_cross_field_rules_explain_themselves():
    with pytest.raises(ConfigError, match="sequence_parallel"):
        resolve_stage_config("pretrain", "tiny", overrides=["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="moe_router_topk"):
        resolve_stage_config("pretrain", "tiny", overrides=["model.moe_router_topk=9"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        resolve_stage_config("pretrain", "tiny", overrides=["train.steps=5"])


def test_pipeline_shares_common_fields_and_names_stage_paths():
    p = resolve_pipeline_config("tiny", {"run_root": "/tmp/x", "pretrain.train.steps": "40"})
    assert p.curate.run_root == p.pretrain.run_root == p.stage("register").run_root == "/tmp/x"
    assert p.pretrain.train.steps == 40
    with pytest.raises(ConfigError, match=r"pretrain\.model\.num_layers"):
        resolve_pipeline_config("tiny", {"pretrain.model.num_layers": 0})


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_stage_config("pretrain", "nope")
    with pytest.raises(ConfigError, match="a.b.c=value"):
        resolve_stage_config("pretrain", "tiny", overrides=["train.steps"])


def test_config_hash_ignores_tracking_but_not_training_fields():
    a = PretrainConfig()
    assert config_hash(a) == config_hash(a.model_copy(update={"tracking": {"tags": {"x": "y"}}}))
    b = resolve_stage_config("pretrain", None, overrides=["train.steps=301"])
    assert config_hash(a) != config_hash(b)


def test_config_file_is_applied_between_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {steps: 50, log_interval: 5}\n")
    cfg = resolve_stage_config("pretrain", "tiny", path, ["train.log_interval=2"])
    assert (cfg.train.steps, cfg.train.log_interval, cfg.model.hidden_size) == (50, 2, 64)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_stage_config("pretrain", "tiny", path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=120)


def test_cli_dry_run_prints_resolved_config():
    out = _cli("pretrain", "--preset", "tiny", "--set", "train.steps=11", "--set", "optimizer.warmup_steps=1", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "steps: 11" in out.stdout and "kv_lora_rank: 32" in out.stdout


def test_cli_invalid_value_exits_nonzero_naming_the_field():
    out = _cli("pretrain", "--preset", "tiny", "--set", "model.num_layers=-3")
    assert out.returncode == 2
    assert "model.num_layers" in out.stderr and "greater than or equal to 1" in out.stderr


def test_config_can_come_from_an_environment_variable(monkeypatch):
    monkeypatch.setenv("SEEKFLOW_STAGE_CONFIG", "train: {steps: 33}\n")
    assert resolve_stage_config("pretrain", "tiny", "env:SEEKFLOW_STAGE_CONFIG").train.steps == 33
    with pytest.raises(ConfigError, match="NOT_SET is not set"):
        resolve_stage_config("pretrain", "tiny", "env:NOT_SET")
