"""Config: presets validate, overrides apply, and every error names the field."""
import subprocess
import sys

import pytest

from tests.support.processes import REPO
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


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_validates_as_a_whole_pipeline(preset):
    pipeline = resolve_pipeline_config(preset)
    assert {cfg.profile for _, cfg in pipeline.instances()} == {preset}


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
    from training.config import ParallelConfig, stage_layers

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
    cfg = resolve_stage_config("pretrain", "tiny", overrides=["train.steps=7", "optimizer.warmup_steps=2",
                                                              "model.q_lora_rank=null", "tracking.tags.dag_run_id=abc"])
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


# ------------------------------------------------------------------------------------------ the stage registry --
def test_the_registry_lists_every_stage_kind_in_pipeline_order_with_a_sound_spec():
    from training.config.pipeline import STAGES, registry_problems

    assert list(STAGES) == ["curate", "pretrain", "evaluate", "register", "promote", "code_cpt", "long_context", "sft",
                            "distill", "grpo", "compress"]
    assert registry_problems() == []
    for kind in STAGES:   # `python -m training <kind>` imports training.stages.<kind>
        assert (REPO / "training" / "stages" / f"{kind}.py").is_file(), kind
    assert resolve_pipeline_config("tiny").model_json_schema()["properties"].keys() >= set(STAGES)


def test_stage_specs_declare_launch_and_upstream_inputs():
    from training.config import CurateConfig, EvaluateConfig, PromoteConfig, RegisterConfig

    pretrain, evaluate = PretrainConfig.stage_spec, EvaluateConfig.stage_spec
    assert (pretrain.launcher, pretrain.gpus_per_node, pretrain.upstream) == ("torchrun", 0, ("curate",))
    assert pretrain.input_fields == ("data_manifest", "init_checkpoint") and "train.steps" in pretrain.form_fields
    assert (evaluate.launcher, evaluate.gpus_per_node, evaluate.upstream) == ("torchrun", 1, ("pretrain",))
    assert CurateConfig.stage_spec.shardable and CurateConfig.stage_spec.launcher == "python"
    assert RegisterConfig.stage_spec.launcher == "python"
    assert RegisterConfig.stage_spec.upstream == ("pretrain", "evaluate")
    assert [i.required for i in RegisterConfig.stage_spec.inputs] == [True, False]   # evaluate's scores: if it ran
    assert PromoteConfig.stage_spec.upstream == ("register",)
    assert not any(i.required for i in PromoteConfig.stage_spec.inputs)   # alone, it promotes @candidate


def test_a_broken_stage_spec_is_reported(monkeypatch):
    from typing import ClassVar

    from training.config import StageConfig, StageInput, StageSpec
    from training.config import pipeline

    class BrokenConfig(StageConfig):
        stage_spec: ClassVar[StageSpec] = StageSpec(
            kind="broken", launcher="python", gpus_per_node=1, shardable=True, form_fields=("train.stepz",),
            inputs=(StageInput("checkpoint", upstream="dpo"),))

    monkeypatch.setitem(pipeline.STAGES, "broken", BrokenConfig)
    assert pipeline.registry_problems() == [
        "broken: launcher 'python' with gpus_per_node 1",
        "broken: shardable, but its config has no `shards` field",
        "broken: no field 'train.stepz'",
        "broken: no field 'checkpoint'",
        "broken: reads 'dpo', which is not a stage registered before it",
    ]


# ------------------------------------------------------------------------------------ two instances of a kind --
def _two_pretrains() -> dict:
    from training.config import load_preset

    doc = load_preset("tiny")
    doc.update(run_root="/tmp/two", seed=7, tracking={"tags": {"dag_run_id": "r1"}})
    doc["pretrain_more"] = {"stage": "pretrain", "init_checkpoint": "/tmp/two/pretrain/release",
                            "train": {"steps": 30}, "optimizer": {"warmup_steps": 3}}
    return doc


R1_STEPS = ("sft_cold_start", "grpo_reasoning", "sft_rejection", "grpo_all")   # the r1 recipe's instances
R1_EVALUATE, R1_REGISTER = [f"evaluate_{s}" for s in R1_STEPS], [f"register_{s}" for s in R1_STEPS]


def test_a_pipeline_holds_two_instances_of_one_stage_kind():
    from training.config import PipelineConfig
    from training.config.loader import validate

    pipeline = validate(PipelineConfig, _two_pretrains())
    first, more = pipeline.pretrain, pipeline.stage("pretrain_more")
    assert type(more) is PretrainConfig and more is pipeline.pretrain_more
    assert (first.stage_name, more.stage_name) == ("pretrain", "pretrain_more")   # {run_root}/<stage_name>/
    for cfg in (first, more):   # the shared keys reach both
        assert (cfg.run_root, cfg.seed, cfg.profile, cfg.tracking.tags) == ("/tmp/two", 7, "tiny", {"dag_run_id": "r1"})
    assert (first.train.steps, more.train.steps, more.optimizer.warmup_steps) == (300, 30, 3)
    # a further instance starts from its kind's section: the same model unless it says otherwise
    assert more.model == first.model and more.model.max_position_embeddings == 512
    assert first.init_checkpoint is None and more.init_checkpoint == "/tmp/two/pretrain/release"
    assert [name for name, _ in pipeline.instances()] == [
        "curate", "curate_code", "pretrain", "pretrain_more", "evaluate", "evaluate_code_cpt", "evaluate_long_context",
        "evaluate_sft", "evaluate_distill", "evaluate_compress", *R1_EVALUATE, "register", "register_code_cpt",
        "register_long_context", "register_sft", "register_distill", "register_compress", *R1_REGISTER, "promote",
        "promote_code_cpt", "promote_long_context", "promote_sft", "promote_distill", "promote_compress",
        "promote_grpo_all", "code_cpt", "long_context", "sft", "sft_cold_start", "distill", "sft_rejection", "grpo",
        "grpo_reasoning", "grpo_all", "compress"]
    dumped = pipeline.model_dump(mode="json")
    assert dumped["pretrain_more"]["stage"] == "pretrain"
    assert validate(PipelineConfig, dumped) == pipeline   # a dump validates back to the same pipeline
    assert config_hash(first) != config_hash(more)
    assert config_hash(more) == config_hash(more.model_copy(update={"name": None}))   # the name is the directory
    with pytest.raises(KeyError, match="no stage 'pretrain_less'.*pretrain_more"):
        pipeline.stage("pretrain_less")


def test_a_further_instance_is_reachable_by_name_from_presets_and_overrides(monkeypatch):
    from training.config import loader, stage_view

    doc = _two_pretrains()
    view = stage_view(doc, "pretrain_more")
    assert view["name"] == "pretrain_more" and "stage" not in view and view["run_root"] == "/tmp/two"
    monkeypatch.setattr(loader, "load_preset", lambda name: _two_pretrains())
    cfg = resolve_stage_config("pretrain_more", "tiny", overrides=["train.steps=40"])
    assert (type(cfg), cfg.stage_name, cfg.train.steps, cfg.seed) == (PretrainConfig, "pretrain_more", 40, 7)
    assert resolve_stage_config("pretrain", "tiny").stage_name == "pretrain"
    with pytest.raises(ConfigError, match="unknown stage 'pretrain_less'"):
        resolve_stage_config("pretrain_less", "tiny")
    # the DAGs' `overrides` Param can add one too: dotted pipeline paths
    monkeypatch.undo()
    p = resolve_pipeline_config("tiny", {"evaluate_more.stage": "evaluate", "evaluate_more.fim.enabled": False})
    assert p.stage("evaluate_more").stage_name == "evaluate_more" and not p.evaluate_more.fim.enabled


@pytest.mark.parametrize("section, field, message", [
    ({"stage": "pretrian"}, "pretrain_more.stage", "unknown stage kind 'pretrian'; choose one of: curate, pretrain"),
    ({"stage": "pretrain", "train": {"steps": 0}}, "pretrain_more.train.steps", "greater than or equal to 1"),
    ({"stage": "pretrain", "name": "other"}, "pretrain_more.name", "named by its key"),
    ({"train": {"steps": 4}}, "pretrain_more", "a further stage instance is a section with `stage: <kind>`"),
])
def test_a_bad_further_instance_fails_naming_the_field(section, field, message):
    from training.config import PipelineConfig
    from training.config.loader import validate

    with pytest.raises(ConfigError) as err:
        validate(PipelineConfig, {**_two_pretrains(), "pretrain_more": section})
    assert f"  {field}: " in str(err.value) and message in str(err.value)


def test_an_instance_reads_another_instance_in_place_of_an_upstream_kind():
    from training.config import PipelineConfig

    pipeline = PipelineConfig.model_validate({
        "evaluate_more": {"stage": "evaluate", "reads": {"pretrain": "pretrain_more"}},
        "pretrain_more": {"stage": "pretrain"}})
    assert pipeline.stage("evaluate_more").upstream("pretrain") == "pretrain_more"
    assert pipeline.evaluate.upstream("pretrain") == "pretrain"
    with pytest.raises(ValueError, match=r"reads: evaluate reads no \['curate'\]"):
        PipelineConfig.model_validate({"evaluate": {"reads": {"curate": "x"}}})


def _chain_default_long_context_reads() -> dict:
    from training.config import PipelineConfig

    return PipelineConfig.model_validate({}).long_context.reads


def test_the_pipeline_chain_gates_every_training_stage_and_reads_the_one_before():
    from training.config import PIPELINE_CHAIN, resolve_pipeline_config

    pipeline = resolve_pipeline_config("tiny")
    assert PIPELINE_CHAIN == ("curate", "pretrain", "evaluate", "register", "promote", "curate_code", "code_cpt",
                              "evaluate_code_cpt", "register_code_cpt", "promote_code_cpt", "long_context",
                              "evaluate_long_context", "register_long_context", "promote_long_context", "sft",
                              "evaluate_sft", "register_sft", "promote_sft")
    reads = {name: pipeline.stage(name).reads for name in PIPELINE_CHAIN}
    assert reads["code_cpt"] == {"curate": "curate_code"}
    # the chain extends the code model (DeepSeek-Coder-V2); tiny extends its pretrained 64-token model (V3 §4.3)
    assert _chain_default_long_context_reads() == {"pretrain": "code_cpt"} and reads["long_context"] == {"pretrain": "pretrain"}
    assert reads["sft"] == {"pretrain": "long_context"}   # V3 §5 fine-tunes the context-extended model
    for trained in ("code_cpt", "long_context", "sft"):
        assert reads[f"evaluate_{trained}"] == {"pretrain": trained}
        assert reads[f"register_{trained}"] == {"pretrain": trained, "evaluate": f"evaluate_{trained}"}
        assert reads[f"promote_{trained}"] == {"register": f"register_{trained}"}
    # a further instance starts from its kind's preset section
    assert pipeline.stage("register_code_cpt").alias == pipeline.register.alias
