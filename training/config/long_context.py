"""The long_context stage's config: YaRN context extension in phases (DeepSeek-V3 §4.3, DeepSeek-V2 §3.1.4).

Each phase starts from the previous phase's release (the first from the parent model) and names its sequence length,
the YaRN settings (s, α, β and the attention temperature), its steps, batch size and learning rate. The architecture
is the parent's: only `model.rope_scaling` and `model.max_position_embeddings` change (`ModelConfig.CONTEXT_FIELDS`).
What can be checked without the parent is checked here, naming the phase's field; `phase_configs` checks the rest
against the parent's architecture and the job's data-parallel size, before any training.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from training.config.base import Section, StageConfig, StageInput, StageSpec
from training.config.model import ModelConfig, YarnConfig
from training.config.parallel import ParallelConfig
from training.config.pretrain import PretrainConfig
from training.config.train import OptimizerConfig, TrainLoopConfig

# The training stage whose release a pipeline's long_context extends by default (DeepSeek-Coder-V2 extends after its
# code continued pretraining). Switch to "code_cpt" once that stage is registered before this one in STAGES.
PARENT_KIND = "pretrain"


class LongContextPhase(Section):
    """One extension phase: a row of DeepSeek-V3 §4.3's two-phase recipe."""

    seq_length: int = Field(..., ge=8, description="Tokens per training sequence (V3 §4.3: 32K, then 128K).")
    factor: float = Field(40.0, gt=1, description="YaRN scale s over the original context (V3 §4.3, V2 §3.1.4: 40).")
    beta_slow: float = Field(1.0, gt=0, description="YaRN α: rotary dims turning fewer than α times over the "
                                                    "original context are interpolated by s (V3, V2: 1).")
    beta_fast: float = Field(32.0, gt=0, description="YaRN β: dims turning more than β times keep their frequency "
                                                     "(V3, V2: 32).")
    mscale_all_dim: float = Field(1.0, ge=0, description="Attention temperature √t = 0.1 · mscale_all_dim · ln s "
                                  "+ 1: 1.0 is V3 §4.3's 0.1 ln s + 1, 0.707 is V2 §3.1.4's 0.0707 ln s + 1.")
    steps: int = Field(1000, ge=1, description="Optimizer steps (V3 §4.3, V2 §3.1.4: 1000).")
    global_batch_size: int = Field(..., ge=1, description="Sequences per step (V3 §4.3: 1920 at 32K, 480 at 128K).")
    lr: float = Field(..., gt=0, description="Learning rate (V3 §4.3: 7.3e-6, the last pretraining rate).")
    min_lr: float | None = Field(None, ge=0, description="Where a decaying schedule ends; default: lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps at the phase's start.")

    def yarn(self, original: int) -> YarnConfig:
        """The phase's rope scaling; mscale equals mscale_all_dim, as in DeepSeek's released configs."""
        return YarnConfig(factor=self.factor, original_max_position_embeddings=original, beta_fast=self.beta_fast,
                          beta_slow=self.beta_slow, mscale_all_dim=self.mscale_all_dim, mscale=self.mscale_all_dim)


class PhaseOptimizer(Section):
    """Adam and the lr schedule's shape, shared by every phase (each phase sets its own rates and warm-up)."""

    decay_style: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Over each phase's steps, from lr to min_lr (V3 §4.3: constant 7.3e-6).")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    clip_grad: float = Field(1.0, gt=0)


class PhaseLoop(Section):
    """The training loop's knobs shared by every phase (each phase sets steps, sequence length and batch size)."""

    micro_batch_size: int = Field(1, ge=1, description="Sequences per forward pass on one data-parallel rank.")
    log_interval: int = Field(10, ge=1)
    save_interval: int = Field(100, ge=1, description="Steps between checkpoints (a phase's last step always saves).")
    keep_last: int = Field(2, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    async_save: bool = False
    peak_flops_per_device: float | None = Field(None, gt=0)


class LongContextError(ValueError):
    """Bad input found before any training: a phase that does not fit the parent model or the job's layout, a parent
    reference that is missing. The message names the field; the job is not retried (`permanent`)."""

    permanent = True


def _at(loc: tuple, message: str, value) -> ValidationError:
    error = PydanticCustomError("value_error", message.replace("{", "{{").replace("}", "}}"))
    return ValidationError.from_exception_data("config", [{"type": error, "loc": loc, "input": value}])


class LongContextConfig(StageConfig):
    """YaRN context extension under torchrun, phase after phase, on the curate stage's corpus."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        kind="long_context", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=2 * 24 * 60,
        inputs=(StageInput("data_manifest", upstream="curate"), StageInput("init_checkpoint", upstream=PARENT_KIND)),
        form_fields=("phases", "rope_scaling", "original_max_position_embeddings", "train.micro_batch_size",
                     "train.log_interval", "train.save_interval", "parallel.context_parallel_size"))

    init_checkpoint: str | None = Field(
        None, min_length=1, description="The model to extend: a release directory, an s3:// URI or a registered "
        "version (models:/name/version, models:/name@alias). Default: the release of the training stage this one "
        f"reads ({PARENT_KIND}, or what `reads` names) under run_root.")
    data_manifest: str | None = Field(None, description="Curate manifest to train on; default {run_root}/curate.")
    original_max_position_embeddings: int | None = Field(
        None, ge=1, description="The context the parent was trained with, which YaRN's s scales (V3 §4.3: 4K). "
        "Default: the parent's original context if it already uses YaRN, else its model.max_position_embeddings.")
    rope_scaling: bool = Field(True, description="False: train the same phases with plain RoPE (the ablation).")
    phases: list[LongContextPhase] = Field(
        default_factory=lambda: [LongContextPhase(seq_length=256, factor=4, steps=30, global_batch_size=2, lr=3e-4)],
        min_length=1, description="Extension phases in order, each {seq_length, factor (s), beta_slow (α), "
        "beta_fast (β), mscale_all_dim, steps, global_batch_size, lr, min_lr, warmup_steps}.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: PhaseOptimizer = Field(default_factory=PhaseOptimizer)
    train: PhaseLoop = Field(default_factory=PhaseLoop)

    @model_validator(mode="after")
    def _phases_fit(self) -> "LongContextConfig":
        """What needs no parent model: each phase within original × s, on the layout, its batch and rates."""
        cp, tp = self.parallel.context_parallel_size, self.parallel.tensor_model_parallel_size
        original = self.original_max_position_embeddings
        for i, p in enumerate(self.phases):
            problem = phase_problem(p, original if self.rope_scaling else None, cp, tp, self.parallel.sequence_parallel,
                                    self.train.micro_batch_size)
            if problem:
                field, message = problem
                raise _at(("phases", i, field), message, getattr(p, field))
        return self


def phase_problem(p: LongContextPhase, original: int | None, cp: int, tp: int, sp: bool,
                  micro_batch_size: int) -> tuple[str, str] | None:
    """(field, why) for the first thing wrong with phase `p`; `original`: the context YaRN scales (None: unknown, or
    plain RoPE)."""
    if original is not None:
        if p.seq_length > original * p.factor:
            return "seq_length", (f"{p.seq_length} tokens is longer than the original context x s ({original} x "
                                  f"{p.factor:g} = {original * p.factor:g}): raise factor or shorten the phase")
        if (original * p.factor) % 1:
            return "factor", (f"original context x s ({original} x {p.factor:g}) must be a whole number of positions "
                              f"(it becomes model.max_position_embeddings, from which transformers derives s)")
    if p.seq_length % (2 * cp):
        return "seq_length", (f"{p.seq_length} is not divisible by 2 x parallel.context_parallel_size ({2 * cp}): "
                              f"each context-parallel rank holds two of the sequence's 2 x CP equal chunks")
    if sp and (p.seq_length // cp) % tp:
        return "seq_length", (f"seq_length / parallel.context_parallel_size ({p.seq_length // cp}) is not divisible "
                              f"by parallel.tensor_model_parallel_size ({tp}) (sequence parallelism)")
    if p.global_batch_size % micro_batch_size:
        return "global_batch_size", (f"{p.global_batch_size} is not a multiple of train.micro_batch_size "
                                     f"({micro_batch_size})")
    if p.warmup_steps >= p.steps:
        return "warmup_steps", f"{p.warmup_steps} must be below the phase's steps ({p.steps})"
    if p.min_lr is not None and p.min_lr > p.lr:
        return "min_lr", f"{p.min_lr:g} is above the phase's lr ({p.lr:g})"
    if p.beta_slow >= p.beta_fast:
        return "beta_slow", f"α ({p.beta_slow:g}) must be below β, beta_fast ({p.beta_fast:g})"
    return None


def original_context(cfg: LongContextConfig, parent: ModelConfig) -> int:
    """The context YaRN's s scales: the configured one, else the parent's own original (already extended), else its
    max_position_embeddings."""
    if cfg.original_max_position_embeddings is not None:
        return cfg.original_max_position_embeddings
    if parent.rope_scaling is not None:
        return parent.rope_scaling.original_max_position_embeddings
    return parent.max_position_embeddings


def phase_model(cfg: LongContextConfig, phase: LongContextPhase, parent: ModelConfig) -> ModelConfig:
    """The parent's architecture with the phase's context: YaRN over the original context, max_position_embeddings
    = original x s (as DeepSeek's released configs: 4096 x 40 = 163840); plain RoPE for the ablation."""
    original = original_context(cfg, parent)
    context = ({"rope_scaling": phase.yarn(original), "max_position_embeddings": round(original * phase.factor)}
               if cfg.rope_scaling else
               {"rope_scaling": None, "max_position_embeddings": max(parent.max_position_embeddings, phase.seq_length)})
    return ModelConfig.model_validate({**parent.model_dump(), **context})


def phase_configs(cfg: LongContextConfig, parent: ModelConfig, data_parallel_size: int) -> list[PretrainConfig]:
    """Each phase as the training config the GPT train module takes; LongContextError naming the field when a phase
    does not fit the parent (original x s) or the job (batch size per data-parallel rank, the layout's own rules)."""
    out, par = [], cfg.parallel
    original = original_context(cfg, parent) if cfg.rope_scaling else None
    per_step = cfg.train.micro_batch_size * data_parallel_size
    for i, p in enumerate(cfg.phases):
        where = f"{cfg.stage_name}.phases.{i}"
        problem = phase_problem(p, original, par.context_parallel_size, par.tensor_model_parallel_size,
                                par.sequence_parallel, cfg.train.micro_batch_size)
        if problem:
            raise LongContextError(f"{where}.{problem[0]}: {problem[1]} (the parent model: {parent.name}, "
                                   f"original context {original})")
        if p.global_batch_size % per_step:
            raise LongContextError(f"{where}.global_batch_size: {p.global_batch_size} is not a multiple of "
                                   f"train.micro_batch_size x data-parallel size ({cfg.train.micro_batch_size} x "
                                   f"{data_parallel_size})")
        vpp = par.virtual_pipeline_model_parallel_size
        if vpp and p.global_batch_size // per_step < par.pipeline_model_parallel_size:
            raise LongContextError(f"{where}.global_batch_size: the interleaved schedule needs at least "
                                   f"parallel.pipeline_model_parallel_size micro-batches per step")
        loop = cfg.train.model_dump()
        try:
            out.append(PretrainConfig(
                profile=cfg.profile, run_root=cfg.run_root, seed=cfg.seed, tracking=cfg.tracking, parallel=par,
                model=phase_model(cfg, p, parent),
                optimizer=OptimizerConfig(**cfg.optimizer.model_dump(), lr=p.lr, min_lr=p.lr if p.min_lr is None
                                          else p.min_lr, warmup_steps=p.warmup_steps),
                train=TrainLoopConfig(**loop, steps=p.steps, seq_length=p.seq_length,
                                      global_batch_size=p.global_batch_size)))
        except ValidationError as err:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                                for e in err.errors())
            raise LongContextError(f"{where}: does not fit the parent model {parent.name} with this layout: "
                                   f"{reasons}") from None
    return out
