"""Model-parallel layout: sizes, selective recompute, and which decoder layers each pipeline stage holds."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config.base import Section

# megatron-core's selective-recompute modules that run on the local (non-Transformer-Engine) layer spec. Its
# "moe_act" is left out: it needs grouped GEMM, i.e. Transformer Engine.
RecomputeModule = Literal["core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"]


class ParallelConfig(Section):
    """Model-parallel sizes; data parallelism is whatever world size is left over."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    virtual_pipeline_model_parallel_size: int | None = Field(
        None, ge=2, description="Model chunks per pipeline stage for megatron-core's interleaved 1F1B schedule "
                                "(smaller pipeline bubble). Needs pipeline_model_parallel_size >= 2 and num_layers "
                                "divisible by pipeline x virtual size. None: no interleaving.")
    context_parallel_size: int = Field(
        1, ge=1, description="Splits each sequence over this many ranks (2 x CP chunks, causal load balanced); "
                             "attention all-gathers the keys and values of the CP group "
                             "(training/model/attention.py).")
    expert_model_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    decoder_first_pipeline_num_layers: int | None = Field(None, ge=1, description="Layers on the first stage.")
    decoder_last_pipeline_num_layers: int | None = Field(None, ge=1, description="Layers on the last stage.")
    use_distributed_optimizer: bool = True
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    moe_grouped_gemm: bool = Field(
        False, description="Run each MoE layer's local experts as two torch._grouped_mm GEMMs instead of "
                           "megatron-core's SequentialMLP loop (training/model/grouped_experts.py). Same parameters "
                           "and checkpoints; for GPUs, where the loop's many small GEMMs leave the device idle. Not "
                           "with train.precision fp8 (FP8 grouped GEMMs are not built).")
    recompute: list[RecomputeModule] = Field(
        default_factory=list,
        description="Activations to recompute in the backward pass instead of keeping (megatron-core's selective "
                    "recompute): core_attn (attention scores; under context parallelism also the gathered keys "
                    "and values), layernorm (the RMSNorms), mla_up_proj (MLA's q/kv up-projections and RoPE), mlp "
                    "(dense FFNs), moe (whole MoE layers), shared_experts. Trades compute for memory; losses are "
                    "unchanged. Empty: keep everything.")

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ValueError("tensor_model_parallel_size > 1 with MoE needs sequence_parallel: true")
        if self.virtual_pipeline_model_parallel_size is not None:
            if self.pipeline_model_parallel_size < 2:
                raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2 "
                                 "(interleaving splits each pipeline stage into model chunks)")
            if self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers:
                raise ValueError("virtual_pipeline_model_parallel_size needs an even split: unset "
                                 "decoder_first/last_pipeline_num_layers")
        return self



def stage_sizes(num_layers: int, par: ParallelConfig) -> list[int] | None:
    """Decoder layers on each pipeline stage, megatron's split: the optional uneven first/last stage, the rest
    evenly; None when the rest cannot be split evenly."""
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    middle = par.pipeline_model_parallel_size - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle < 0 or rest < 0 or (middle == 0 and rest) or (middle and rest % middle):
        return None
    return ([first] if first is not None else []) + [rest // middle if middle else 0] * middle \
        + ([last] if last is not None else [])


def stage_layers(num_layers: int, par: ParallelConfig) -> list[list[int]]:
    """0-based decoder layer indices each pipeline stage holds (`stage_sizes`; with virtual pipelining stage s holds
    chunks s, s+P, s+2P, ... of equal size). The layout must be valid (PretrainConfig checks it)."""
    stages = par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp:
        size = num_layers // (stages * vpp)
        return [[i for chunk in range(s, stages * vpp, stages) for i in range(chunk * size, (chunk + 1) * size)]
                for s in range(stages)]
    sizes = stage_sizes(num_layers, par)
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]

