"""seekflow configuration: pure Python (pydantic + PyYAML), safe to import from Airflow."""
from training.config.loader import (
    ConfigError,
    apply_overrides,
    config_hash,
    list_presets,
    load_preset,
    resolve_pipeline_config,
    resolve_stage_config,
    stage_view,
    to_yaml,
)
from training.config.models import (
    STAGES,
    CurateConfig,
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    PretrainConfig,
    RegisterConfig,
    StageConfig,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "list_presets",
    "load_preset",
    "resolve_pipeline_config",
    "resolve_stage_config",
    "stage_view",
    "to_yaml",
    "STAGES",
    "CurateConfig",
    "ModelConfig",
    "ParallelConfig",
    "PipelineConfig",
    "PretrainConfig",
    "RegisterConfig",
    "StageConfig",
]
