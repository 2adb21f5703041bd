"""The training loop's knobs, shared by every stage that trains: optimizer and learning-rate schedule, steps and
batch sizes, checkpoint cadence, precision, and the batch-size ramp."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config.base import Section


class OptimizerConfig(Section):
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    decay_style: Literal["cosine", "constant", "linear", "deepseek-v3", "multi-step"] = Field(
        "cosine", description="cosine/constant/linear: megatron-core's, over train.steps. deepseek-v3: V3 §4.2 "
                              "(constant_tokens, decay_tokens, lr_tail). multi-step: DeepSeek LLM §2.3 (lr_steps).")
    constant_tokens: float | None = Field(None, ge=0, description="deepseek-v3: tokens at peak lr, warm-up "
                                                                  "included, before the cosine decay (V3: 10e12).")
    decay_tokens: float | None = Field(None, gt=0, description="deepseek-v3: cosine decay to min_lr over this many "
                                                               "tokens (V3: 4.3e12).")
    lr_tail: list[tuple[float, float]] = Field(
        default_factory=list, description="deepseek-v3: [tokens, lr] stages after the decay "
                                          "(V3: [[333e9, 2.2e-5], [167e9, 7.3e-6]]).")
    lr_steps: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.8, 0.316), (0.9, 0.1)],
        description="multi-step: [fraction of the run's tokens, fraction of peak lr] (DeepSeek LLM: 80% → 31.6%, "
                    "90% → 10%).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="DeepSeek-V3 §4.2: β1 = 0.9.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="DeepSeek-V3 §4.2: β2 = 0.95.")
    weight_decay: float = Field(0.1, ge=0, description="DeepSeek-V3 §4.2: weight decay 0.1.")
    clip_grad: float = Field(1.0, gt=0, description="DeepSeek-V3 §4.2: gradient clipping norm 1.0.")

    @model_validator(mode="after")
    def _check_schedule(self) -> "OptimizerConfig":
        if self.decay_style == "deepseek-v3" and (self.constant_tokens is None or self.decay_tokens is None):
            raise ValueError("decay_style deepseek-v3 needs optimizer.constant_tokens and optimizer.decay_tokens")
        return self


class BatchSizeRampup(Section):
    """Batch-size warm-up, as megatron-core's `rampup_batch_size` ([start, increment, samples]): the global batch
    starts at start_batch_size and grows by batch_size_increment in equal shares of the ramp's samples."""

    start_batch_size: int = Field(..., ge=1, description="Sequences per step at the start (DeepSeek-V3 §4.2: 3072).")
    batch_size_increment: int = Field(..., ge=1, description="Sequences added at each increase; must divide "
                                                             "global_batch_size - start_batch_size.")
    ramp_tokens: float = Field(..., gt=0, description="Tokens over which the batch reaches global_batch_size "
                                                      "(DeepSeek-V3 §4.2: 469e9).")


class TrainLoopConfig(Section):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    seq_length: int = Field(64, ge=8)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(2, ge=1, description="Sequences per step across data-parallel ranks.")
    log_interval: int = Field(10, ge=1, description="Steps between progress lines and MLflow metrics.")
    save_interval: int = Field(100, ge=1, description="Steps between checkpoints (the last step always saves).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    precision: Literal["fp32", "bf16", "fp8"] = Field(
        "fp32", description="fp32: everything in float32. bf16: megatron-core mixed precision, bf16 weights and "
                            "activations with fp32 master weights, optimizer state and gradient reduction. fp8: "
                            "bf16, with the linear layers' GEMMs in blockwise FP8 (DeepSeek-V3 §3.3; a CPU "
                            "emulation: training/model/fp8_linear.py).")
    fp8_shadow_interval: int | None = Field(
        50, ge=1, description="precision fp8: every this many steps, one micro-batch recomputed in the training "
                              "precision with the same weights; the relative loss gap and each FP8 GEMM's error are "
                              "logged (training/train/fp8_monitor.py). None: off. Ignored in fp32 and bf16.")
    # DeepSeek-V3 §3.3: FP8 training's relative loss error stays below 0.25% of BF16's
    fp8_shadow_threshold: float = Field(0.0025, gt=0, description="Warn, naming the step, when the shadow loss gap "
                                                                  "exceeds this (relative).")
    peak_flops_per_device: float | None = Field(None, gt=0, description="Peak FLOP/s of one device, for model "
                                                                        "FLOPs utilisation (None: no MFU metric).")
    batch_size_rampup: BatchSizeRampup | None = Field(
        None, description="Ramp the global batch size up from a smaller one (DeepSeek-V3 §4.2: 3072 → 15360 over "
                          "the first 469B tokens; DeepSeek LLM uses none). None: global_batch_size from step 1.")
    async_save: bool = Field(
        False, description="Write checkpoints in a forked process (megatron-core dist_checkpointing's async save) "
                           "while training goes on; the `latest` marker appears only once the save is complete. Off "
                           "by default: on CPU the writer competes with training for the same cores (tiny model, 2 "
                           "cores, a save every step: 0.3 s blocked per save instead of 1 s, but 41 s per run "
                           "instead of 35 s). On GPUs, where training does not use the CPU, turn it on.")

    @model_validator(mode="after")
    def _check_rampup(self) -> "TrainLoopConfig":
        ramp = self.batch_size_rampup
        if ramp is not None:
            gap = self.global_batch_size - ramp.start_batch_size
            if gap <= 0 or gap % ramp.batch_size_increment:
                raise ValueError(f"train.batch_size_rampup: global_batch_size - start_batch_size ({gap}) must be a "
                                 f"positive multiple of batch_size_increment ({ramp.batch_size_increment})")
            for name in ("start_batch_size", "batch_size_increment"):
                if getattr(ramp, name) % self.micro_batch_size:
                    raise ValueError(f"train.batch_size_rampup.{name} ({getattr(ramp, name)}) must be a multiple "
                                     f"of train.micro_batch_size ({self.micro_batch_size})")
            if ramp.ramp_tokens < self.seq_length:
                raise ValueError("train.batch_size_rampup.ramp_tokens is shorter than one sequence")
        return self

