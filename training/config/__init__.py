"""seekflow configuration: pure Python (pydantic + PyYAML), safe to import from Airflow.

Modules, none importing a later one: base (Section, StageConfig, the stage metadata) → model, parallel, train →
one module per stage (curate, pretrain, evaluate, registry, code_cpt, long_context, sft, distill, grpo, compress) → pipeline
(the stage registry) → loader.
"""
from training.config.base import SHARED_KEYS, Section, StageConfig, StageInput, StageSpec, TrackingConfig
from training.config.curate import CurateConfig, CurateSource
from training.config.compress import CompressConfig
from training.config.distill import DistillConfig
from training.config.evaluate import EvaluateConfig
from training.config.grpo import GrpoConfig
from training.config.loader import (
    ConfigError,
    apply_overrides,
    config_hash,
    list_presets,
    load_preset,
    resolve_pipeline_config,
    resolve_stage_config,
    stage_kind,
    stage_view,
    to_yaml,
)
from training.config.model import ModelConfig, YarnConfig
from training.config.parallel import ParallelConfig, RecomputeModule, stage_layers, stage_sizes
from training.config.pipeline import (COMPRESS_CHAIN, DISTILL_CHAIN, PIPELINE_CHAIN, POST_TRAIN_CHAIN, R1_CHAIN, RECIPES, STAGES,
                                      PipelineConfig, chain_kind)
from training.config.pretrain import PretrainConfig
from training.config.registry import GateRule, PromoteConfig, RegisterConfig
from training.config.train import BatchSizeRampup, OptimizerConfig, TrainLoopConfig

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "list_presets",
    "load_preset",
    "resolve_pipeline_config",
    "resolve_stage_config",
    "stage_kind",
    "stage_view",
    "to_yaml",
    "SHARED_KEYS",
    "STAGES",
    "PIPELINE_CHAIN",
    "POST_TRAIN_CHAIN",
    "R1_CHAIN",
    "RECIPES",
    "COMPRESS_CHAIN",
    "CompressConfig",
    "DISTILL_CHAIN",
    "chain_kind",
    "BatchSizeRampup",
    "CurateConfig",
    "CurateSource",
    "DistillConfig",
    "EvaluateConfig",
    "GateRule",
    "GrpoConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PipelineConfig",
    "PretrainConfig",
    "PromoteConfig",
    "RecomputeModule",
    "RegisterConfig",
    "Section",
    "StageConfig",
    "StageInput",
    "StageSpec",
    "TrackingConfig",
    "TrainLoopConfig",
    "YarnConfig",
    "stage_layers",
    "stage_sizes",
]
